"""A pipecat transport over one call's RtpSession: 8 kHz mono PCM both ways, RFC 4733 DTMF both ways.

Input: the session's 20 ms clock hands up the caller's decoded audio (silence where nothing came,
as on a phone line, so VAD sees the end of speech) and key presses as `InputDTMFFrame`.

Output: pipecat's media sender cuts the agent's audio into 20 ms chunks; each write waits until at
most one packet is queued ahead of the wire, so playback runs in real time and a barge-in
(`InterruptionFrame`) that drops the queue silences our RTP within one packet.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from loguru import logger
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputDTMFFrame,
    OutputDTMFUrgentFrame,
    StartFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams

from .rtp import PTIME, RtpSession
from .sdp import G711_CLOCK_RATE

SIP_RATE = G711_CLOCK_RATE  # the line's PCM: G.711 is sampled at its clock rate
PACKETS_AHEAD = 1
PLAYED_WAIT_SECS = 0.5  # our queue holds at most a packet or two ahead of the wire


class SipInputTransport(BaseInputTransport):
    def __init__(self, session: RtpSession, params: TransportParams, **kwargs):
        super().__init__(params, **kwargs)
        self._session = session
        self._ready = False

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)
        self._ready = True
        self._session.on_audio = self._on_audio
        self._session.on_dtmf = self._on_dtmf

    async def _on_audio(self, pcm: bytes) -> None:
        if self._ready:
            await self.push_audio_frame(InputAudioRawFrame(audio=pcm, sample_rate=SIP_RATE, num_channels=1))

    async def _on_dtmf(self, digit: str) -> None:
        if not self._ready:
            return
        try:
            button = KeypadEntry(digit)
        except ValueError:  # A-D have no KeypadEntry; nothing downstream could act on them
            logger.info(f"{self}: key {digit!r} ignored")
            return
        await self.push_frame(InputDTMFFrame(button=button))


class SipOutputTransport(BaseOutputTransport):
    def __init__(self, session: RtpSession, params: TransportParams, **kwargs):
        super().__init__(params, **kwargs)
        self._session = session
        self._unplayed = 0.0

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if isinstance(frame, InterruptionFrame):
            # Drop before the base class passes the frame on: the tracker downstream asks at once
            # how much of what we took was never sent.
            self._unplayed = self._session.drop_queued() * PTIME
        await super().process_frame(frame, direction)

    def unplayed_seconds(self) -> float:
        """Audio taken from the pipeline but dropped unsent at the last barge-in."""
        return self._unplayed

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        return await self._session.play(frame.audio, ahead=PACKETS_AHEAD)

    def _supports_native_dtmf(self) -> bool:
        return self._session.telephone_event_pt is not None

    async def _write_dtmf_native(self, frame: OutputDTMFFrame | OutputDTMFUrgentFrame):
        buttons = frame.buttons or ([frame.button] if frame.button else [])
        for button in buttons:
            await self._session.send_dtmf(str(button.value))


class SipPlayout:
    """The playout of a SIP line: what a barge-in dropped from the RTP queue unsent, and a wait for
    the queue to empty (what is sent is played; the jitter buffer at the far end is not ours to see)."""

    def __init__(self, session: RtpSession, output: SipOutputTransport):
        self._session = session
        self._output = output

    def unplayed_seconds(self) -> float:
        return self._output.unplayed_seconds()

    async def wait_played(self) -> None:
        await self._session.drain(PLAYED_WAIT_SECS)


class SipCallTransport(BaseTransport):
    """Both directions of one SIP call's media, at 8 kHz: a transports.line.Line."""

    kind = "sip"
    in_rate = SIP_RATE
    out_rate = SIP_RATE
    can_transfer = True

    def __init__(
        self,
        session: RtpSession,
        *,
        name: str | None = None,
        transfer: Callable[[str], Awaitable[bool]] | None = None,
        hang_up: Callable[[], Awaitable[None]] | None = None,
    ):
        """`transfer`: the dialog's blind transfer (REFER), for a flow's transfer_call. `hang_up`: the
        dialog's BYE."""
        super().__init__(name=name)
        self.session = session
        self._transfer = transfer
        self._hang_up = hang_up
        self._params = TransportParams(
            audio_in_enabled=True,
            audio_in_sample_rate=SIP_RATE,
            audio_out_enabled=True,
            audio_out_sample_rate=SIP_RATE,
            audio_out_10ms_chunks=int(PTIME * 100),
            # Our sender fills gaps with line silence itself; pipecat's extra seconds would only
            # delay the BYE after the agent hangs up.
            audio_out_end_silence_secs=0,
        )
        self._input = SipInputTransport(session, self._params, name=f"{self.name}-input")
        self._output = SipOutputTransport(session, self._params, name=f"{self.name}-output")
        self._playout = SipPlayout(session, self._output)

    def input(self) -> SipInputTransport:
        return self._input

    def output(self) -> SipOutputTransport:
        return self._output

    @property
    def playout(self) -> SipPlayout:
        return self._playout

    async def hang_up(self) -> None:
        """End the dialog (BYE), through whatever the glue gave; without it, only the pipeline ends."""
        if self._hang_up is not None:
            await self._hang_up()

    async def transfer(self, target: str) -> bool:
        """Ask the caller's side to call `target` instead (REFER); True when it accepted."""
        if self._transfer is None:
            logger.warning(f"{self.name}: transfer to {target} asked for, but this call has no dialog to REFER")
            return False
        return await self._transfer(target)
