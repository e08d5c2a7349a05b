"""What the pipeline's Chroma service needs of a call's engine session.

`ChromaS2SService` (service.py) drives one session per call through these members only. `ChromaSession`
(session.py) is the real one; the benchmarks' stand-ins (bench/pipeline) answer with a tone instead, so
that a benchmark measures the framework around the engine. Both are checked against this contract, with
matching signatures (tests/bench/test_session_protocol.py): a stand-in that lags behind the real session
fails there rather than failing every reply of a benchmark run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class SpeechChunk(Protocol):
    """One piece of a reply, as the service passes it on."""

    audio: np.ndarray  # float32, 24 kHz mono
    frames: tuple[int, int]  # [start, end) engine frames (80 ms each) within the reply
    text: str  # the reply's text up to the end of this chunk


@runtime_checkable
class SpeechSession(Protocol):
    """One call's conversation with the speech-to-speech model."""

    model: Any  # its `source`, if it has one, names the model in pipecat's settings
    system_prompt: str  # the agent's own prompt; a flow's instruction equal to it is not repeated
    on_tool_call: Callable[[Any], None] | None  # set by the service; called on the event loop

    def respond(
        self, user_audio_16k: np.ndarray | None = None, *, say: str | None = None
    ) -> AsyncIterator[SpeechChunk]:
        """The reply to one caller turn (16 kHz audio), or the agent's own turn (no audio); `say`: exactly
        this text. An async iterator of chunks, streamed as they are made."""
        ...

    def cancel(self) -> None:
        """Barge-in: stop the reply under way; no further chunk comes."""
        ...

    def heard(self, frames: int) -> None:
        """The caller heard this many frames of the last reply; the conversation keeps only those."""
        ...

    def instruct(self, text: str) -> None:
        """A system instruction read before the next reply (a flow node's task)."""
        ...

    def set_tools(self, tools: Any) -> None:
        """The functions the model may call from the next reply on."""
        ...

    def tool_result(self, result: Any) -> None:
        """The result of the last reply's tool call, read before the next reply."""
        ...

    def set_voice(self, voice: Any) -> None:
        """Speak in `voice` from the next reply on."""
        ...

    async def prepare_voice(self) -> None:
        """Get the voice set for the next reply ready now, so that reply does not wait for it."""
        ...

    @property
    def kept_text(self) -> str:
        """The text of the last reply that the conversation keeps (what the caller heard of it)."""
        ...
