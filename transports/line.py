"""What a call needs of the line it runs on: the one shape every transport takes.

A line is a pipecat transport (its `input()` and `output()` processors open and close the call's
pipeline) plus what the call asks of the line itself. Keypad presses arrive from `input()` as
`InputDTMFFrame`; the agent's key presses go to `output()` as `OutputDTMFUrgentFrame`. Nothing here
knows about agents: the glue that runs a call on a line lives in `agent/lines/`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pipecat.processors.frame_processor import FrameProcessor
from pipecat.transports.base_transport import BaseTransport


@runtime_checkable
class Playout(Protocol):
    """The far end's side of the agent's audio: the line's feed to the call's account of what the
    caller heard. A line that plays as it writes (WebRTC, a file) has nothing unplayed."""

    def unplayed_seconds(self) -> float:
        """Seconds of agent audio written to the line and not played at the far end when the last
        barge-in cleared it (Twilio: sent, mark not echoed; SIP: queued, never sent)."""
        ...

    async def wait_played(self) -> None:
        """Returns once everything written so far has been played at the far end (bounded in time)."""
        ...


@runtime_checkable
class Line(Protocol):
    kind: str  # "webrtc", "twilio", "sip", "file": metrics, records and each transport's max_calls
    in_rate: int  # the rate the caller's audio enters the pipeline at
    out_rate: int  # the rate the line takes the agent's audio at
    can_transfer: bool  # False: transfer() always refuses (the line has no way to hand a caller on)

    def input(self) -> FrameProcessor: ...

    def output(self) -> FrameProcessor: ...

    @property
    def playout(self) -> Playout: ...

    async def hang_up(self) -> None:
        """End the call from the agent's side (BYE, Twilio's hang-up, closing the peer connection)."""
        ...

    async def transfer(self, target: str) -> bool:
        """Hand the caller to `target`; False when this line cannot transfer or the far end refused."""
        ...


class PlaysAsWritten:
    """The playout of a line that plays the agent's audio as it writes it: nothing is ever unplayed."""

    def unplayed_seconds(self) -> float:
        return 0.0

    async def wait_played(self) -> None:
        return None


PLAYS_AS_WRITTEN = PlaysAsWritten()


class TransportLine(BaseTransport):
    """Any other pipecat transport as a line that plays as it writes and cannot hang up or transfer by
    itself (ending its pipeline ends the call): a websocket transport with a serializer, say."""

    can_transfer = False
    playout = PLAYS_AS_WRITTEN

    def __init__(self, transport: BaseTransport, *, kind: str, in_rate: int, out_rate: int):
        super().__init__(name=transport.name)
        self.transport = transport
        self.kind, self.in_rate, self.out_rate = kind, in_rate, out_rate

    def input(self) -> FrameProcessor:
        return self.transport.input()

    def output(self) -> FrameProcessor:
        return self.transport.output()

    async def hang_up(self) -> None:
        return None

    async def transfer(self, target: str) -> bool:
        return False
