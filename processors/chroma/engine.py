"""The model as the rest of the package uses it: `ChromaModel`'s modules plus its entry points.

`load_model()` returns a `ChromaEngine`. Its methods only hand over to the modules that hold
the work, so `modeling.py` stays modules and maths:

    generate_codes / decode_codes -> generation.py (the conformance seam: the released
                                      processor's tensors in, codes and audio out)
    new_session                   -> session.py (one streaming conversation per call, served by
                                      the model's scheduler, scheduler.py)
"""

from __future__ import annotations

import torch

from .generation import decode_codes, generate_codes
from .modeling import ChromaModel
from .session import ChromaSession


class ChromaEngine(ChromaModel):
    def generate_codes(self, inputs: dict, max_new_frames: int, do_sample: bool = False, **kwargs) -> torch.Tensor:
        """Codes [B, T, num_codebooks] for the released processor's tensors (see generation.generate_codes)."""
        return generate_codes(self, inputs, max_new_frames, do_sample=do_sample, **kwargs)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """24 kHz audio [B, T * frame] for codes [B, T, num_codebooks]; pad frames are silence."""
        return decode_codes(self, codes)

    def new_session(self, voice, system_prompt: str = "", **kwargs) -> ChromaSession:
        """A streaming conversation for one call; see `session.ChromaSession`."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; load it with load_model()")
        return ChromaSession(self, self.tokenizer, voice, system_prompt, **kwargs)
