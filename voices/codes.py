"""A voice's codec codes, computed once per model and stored beside the voice.

    codes = voice_codes(voice, model)     # [frames, codebooks]; encodes only on a cache miss

The file is `<voice>/codes/<model identity>.npz`. The identity is a digest of the codec's weights,
dtype and device type: the codes depend on nothing else of the model, and bf16 on a GPU can pick
other codes than float32 on a CPU. The file also records which audio it encodes, so a replaced
recording is encoded again.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from pathlib import Path

import numpy as np
import torch
from loguru import logger

CODES_FOLDER = "codes"

_identities: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def model_identity(model) -> str:
    """`codec-<digest>`: the same for every load of the same weights, different when they change."""
    with _lock:
        if model in _identities:
            return _identities[model]
        digest = hashlib.sha256()
        digest.update(f"{model.config.audio_num_codebooks}|{model.dtype}|{model.device.type}".encode())
        for name, tensor in sorted(model.codec_model.state_dict().items()):
            data = tensor.detach().contiguous().cpu()
            digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        identity = "codec-" + digest.hexdigest()[:20]
        _identities[model] = identity
        return identity


def codes_path(voice, model) -> Path:
    return voice.folder / CODES_FOLDER / f"{model_identity(model)}.npz"


def voice_codes(voice, model) -> torch.Tensor:
    """The voice's reference encoded by `model`'s codec, as a long tensor [frames, codebooks]."""
    path = codes_path(voice, model)
    stored = _read(path, voice.key)
    if stored is not None:
        return torch.from_numpy(stored)
    with torch.inference_mode():
        audio = torch.from_numpy(np.ascontiguousarray(voice.audio, dtype=np.float32)).reshape(1, 1, -1)
        codes = model.encode_audio(audio)[0].cpu()
    _write(path, codes.numpy(), voice.key)
    return codes


def _read(path: Path, audio_key: str) -> np.ndarray | None:
    try:
        with np.load(path) as stored:
            if str(stored["audio_key"]) != audio_key:
                return None
            return stored["codes"].astype(np.int64)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as exc:  # a damaged file is simply computed again
        logger.warning(f"{path}: unreadable stored voice codes ({exc}); encoding the voice again")
        return None


def _write(path: Path, codes: np.ndarray, audio_key: str) -> None:
    try:
        path.parent.mkdir(exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial.npz")
        np.savez(partial, codes=codes.astype(np.int32), audio_key=np.array(audio_key))
        os.replace(partial, path)  # readers never see half a file
    except OSError as exc:
        logger.warning(f"{path}: cannot store the voice's codes ({exc.strerror or exc}); they are kept for this "
                       "process only and computed again by the next")
