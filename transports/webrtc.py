"""One browser call as a line: pipecat's SmallWebRTC transport over the call's peer connection.

    line = WebRTCLine(connection, on_bad_input=lambda kind: ...)   # connection: initialised from the offer
    call = runtime.new_call(line)

The caller's audio comes in at 16 kHz, the agent's goes out at Opus's 48 kHz. Keys pressed on the page
travel over the data channel as `{"type": "chroma-agents", "dtmf": "12#"}` and come out of `input()` as
`InputDTMFFrame`, as a phone's would. The browser plays what it receives as it comes: nothing is
unplayed when the caller barges in. A browser call cannot be transferred.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from loguru import logger
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import InputDTMFFrame
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

from .line import PLAYS_AS_WRITTEN

WEBRTC_IN_RATE = 16000  # what the VAD listens at; aiortc resamples the browser's Opus to it
WEBRTC_OUT_RATE = 48000  # Opus runs at 48 kHz; sending at its rate saves aiortc a resample
MAX_DTMF_PER_MESSAGE = 32
KEYS = frozenset(k.value for k in KeypadEntry)
# A write to the browser's track returns once its sender has taken the chunk, at the pace of real time.
# A caller who hangs up while the call is ending (the agent's goodbye still going out) leaves one write
# that nothing will ever take; this is how long it may hold the call before the peer is written off.
WRITE_TIMEOUT_SECS = 3.0


class WebRTCLine(SmallWebRTCTransport):
    """Events (pipecat's): on_client_disconnected(line, connection) when the browser closed the call.
    `on_bad_input(kind)` is called once per dropped data channel message ("bad_dtmf")."""

    kind = "webrtc"
    in_rate = WEBRTC_IN_RATE
    out_rate = WEBRTC_OUT_RATE
    can_transfer = False
    playout = PLAYS_AS_WRITTEN

    def __init__(
        self,
        connection: SmallWebRTCConnection,
        *,
        on_bad_input: Callable[[str], None] | None = None,
        name: str | None = None,
    ):
        params = TransportParams(
            audio_in_enabled=True,
            audio_in_sample_rate=WEBRTC_IN_RATE,
            audio_out_enabled=True,
            audio_out_sample_rate=WEBRTC_OUT_RATE,
            # The browser plays out what it has received; trailing silence would only delay the
            # hang-up the page waits for.
            audio_out_end_silence_secs=0,
            audio_out_write_timeout_secs=WRITE_TIMEOUT_SECS,
        )
        super().__init__(connection, params)
        if name is not None:
            self._name = name
        self.connection = connection
        self._on_bad_input = on_bad_input
        self.add_event_handler("on_app_message", self._app_message)

    async def hang_up(self) -> None:
        """Close the peer connection: the page sees the call end."""
        await self.connection.disconnect()

    async def transfer(self, target: str) -> bool:
        return False  # a browser has no number to hand on

    async def _app_message(self, _line, message, _sender) -> None:
        """Keys from the page's data channel, one DTMF frame per digit; anything else is left alone."""
        if not (isinstance(message, dict) and message.get("type") == "chroma-agents" and "dtmf" in message):
            return
        digits = message["dtmf"]
        if not (isinstance(digits, str) and 0 < len(digits) <= MAX_DTMF_PER_MESSAGE and set(digits) <= KEYS):
            if self._on_bad_input is not None:
                self._on_bad_input("bad_dtmf")
            logger.warning(
                f"{self.name}: dropped data channel message dtmf={json.dumps(digits)[:40]}; "
                f"expected 1 to {MAX_DTMF_PER_MESSAGE} of {''.join(sorted(KEYS))}"
            )
            return
        for digit in digits:
            await self.input().push_frame(InputDTMFFrame(button=KeypadEntry(digit)))
