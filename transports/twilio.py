"""One Twilio phone call as a pipecat transport: a Media Stream WebSocket in, paced agent audio out.

    transport = TwilioCallTransport(websocket, state, on_bad_input=lambda kind: ...)
    call = runtime.new_call(transport, call_id=state.call_sid)    # a transports.line.Line at 8 kHz

The route accepts the socket and reads `connected`/`start` through ``state`` (a TwilioStreamState) before
building this; from StartFrame on, the input side reads the rest. The wire format lives in
transports/twilio_wire.py; this module only moves frames and paces audio.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from loguru import logger
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams
from starlette.websockets import WebSocket, WebSocketState

from processors.audio import ulaw_encode

from .twilio_webhook import hangup_twiml, transfer_twiml, update_call
from .twilio_wire import TWILIO_RATE, Dtmf, Media, Stop, TwilioPlayout, TwilioStreamState

CHUNK_SECS = 0.02  # one media message per 20 ms, the size Twilio itself sends
# Twilio plays what we send in order from its own queue. Staying this far ahead of its playback keeps
# the caller's audio gapless through our scheduling jitter while leaving little to `clear` on barge-in.
LEAD_SECS = 0.2
MARK_EVERY_CHUNKS = 4  # a mark per 80 ms of audio: one Chroma frame, the unit a cut reply is measured in

BadInputCallback = Callable[[str], None]
_warned_no_rest = False


class TwilioCallTransport(BaseTransport):
    """A pipecat transport over one accepted Media Stream WebSocket whose `start` was already read: a
    transports.line.Line whose playout is its output's account of Twilio's marks.

    Events: ``on_client_disconnected(transport, websocket)`` when the caller sent `stop` or the socket
    went away. ``on_bad_input(kind)`` is called once per dropped message (kinds from twilio_wire's
    ERROR_KINDS, plus ``bad_dtmf``). For hang-up and transfer over REST, pass ``rest_client`` (a
    ``twilio.rest.Client``) or ``account_sid`` and ``auth_token`` to build one.
    """

    kind = "twilio"
    in_rate = TWILIO_RATE
    out_rate = TWILIO_RATE
    can_transfer = True

    def __init__(
        self,
        websocket: WebSocket,
        state: TwilioStreamState,
        *,
        on_bad_input: BadInputCallback | None = None,
        rest_client=None,
        account_sid: str | None = None,
        auth_token: str | None = None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        if state.stream_sid is None:
            raise ValueError(
                "state has no stream yet: read Twilio's `start` message before building the transport"
            )
        self.websocket = websocket
        self.state = state
        self.caller_stopped = False  # Twilio sent `stop` (the call or stream already ended there)
        self.transferred = False  # a transfer was accepted: the call is no longer ours to hang up
        self._on_bad_input = on_bad_input
        self._rest_client = rest_client
        self._account_sid = account_sid or state.account_sid
        self._auth_token = auth_token
        self._closing = False
        self._send_lock = asyncio.Lock()
        params = TransportParams(
            audio_in_enabled=True,
            audio_in_sample_rate=TWILIO_RATE,
            audio_out_enabled=True,
            audio_out_sample_rate=TWILIO_RATE,
            audio_out_10ms_chunks=round(CHUNK_SECS * 100),
            audio_out_end_silence_secs=0,  # silence would only delay the hang-up
        )
        self._input = TwilioInputTransport(self, params, name=f"{self.name}#input")
        self._output = TwilioOutputTransport(self, params, name=f"{self.name}#output")
        self._register_event_handler("on_client_disconnected")

    def input(self) -> TwilioInputTransport:
        return self._input

    def output(self) -> TwilioOutputTransport:
        return self._output

    @property
    def playout(self) -> TwilioPlayout:
        """Twilio plays from its own queue: what it has not played is what its marks have not echoed."""
        return self.state.playout

    # -- the socket, shared by both sides --

    async def send(self, text: str) -> bool:
        """Send one message; False when the socket is gone (the caller left: nothing to report)."""
        if self._closing or self.websocket.application_state != WebSocketState.CONNECTED:
            return False
        try:
            async with self._send_lock:
                await self.websocket.send_text(text)
            return True
        except Exception as e:  # a socket that vanished mid-send raises several kinds
            logger.debug(f"Twilio call {self.state.call_sid}: send failed ({type(e).__name__}: {e})")
            return False

    async def close(self) -> None:
        """Close the socket once; Twilio then ends the `<Connect>` (and the call, with no TwiML after it)."""
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(Exception):
            if self.websocket.application_state == WebSocketState.CONNECTED:
                await self.websocket.close()

    @property
    def closing(self) -> bool:
        return self._closing

    def bad_input(self, kind: str) -> None:
        if self._on_bad_input is not None:
            try:
                self._on_bad_input(kind)
            except Exception:  # counting must never cost the call
                logger.exception("Twilio bad-input callback failed")

    async def caller_left(self) -> None:
        await self._call_event_handler("on_client_disconnected", self.websocket)

    # -- REST: hang up and transfer --

    async def hang_up(self) -> bool:
        """Hang the call up at Twilio (`<Hangup/>`). Errors are logged; returns whether Twilio took it."""
        return await self._update(hangup_twiml(), "hang-up")

    async def transfer(self, target: str) -> bool:
        """Transfer the call (`<Dial>` an E.164 number or SIP URI). Errors are logged, never raised."""
        try:
            twiml = transfer_twiml(target)
        except ValueError as e:
            logger.error(f"Twilio call {self.state.call_sid}: transfer not sent: {e}")
            return False
        self.transferred = await self._update(twiml, "transfer")
        return self.transferred

    def _client(self):
        if self._rest_client is None and self._account_sid and self._auth_token:
            from twilio.rest import Client

            self._rest_client = Client(self._account_sid, self._auth_token)
        return self._rest_client

    async def _update(self, twiml: str, what: str) -> bool:
        client = self._client()
        if client is None:
            global _warned_no_rest
            if not _warned_no_rest:  # a setting missing for the whole server: say it once, not per call
                _warned_no_rest = True
                logger.warning(
                    f"Twilio {what} over REST needs an account SID and auth token (transports.twilio.account_sid "
                    "or TWILIO_ACCOUNT_SID); without them an agent hang-up only closes the stream"
                )
            return False
        try:
            # twilio's client is synchronous (requests): keep it off the event loop.
            await asyncio.to_thread(update_call, client, self.state.call_sid, twiml)
            return True
        except Exception as e:
            logger.error(f"Twilio call {self.state.call_sid}: {what} failed: {type(e).__name__}: {e}")
            return False


class TwilioInputTransport(BaseInputTransport):
    """Reads the socket from StartFrame on: caller audio, DTMF, mark echoes (applied by the stream
    state), `stop`."""

    def __init__(self, transport: TwilioCallTransport, params: TransportParams, **kwargs):
        super().__init__(params, **kwargs)
        self._transport = transport
        self._receive_task: asyncio.Task | None = None
        self._stopping = False

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)
        if not self._receive_task:
            self._receive_task = self.create_task(self._receive(), "twilio-receive")

    async def stop(self, frame: EndFrame):
        # The receive task keeps running: the output still needs mark echoes while its audio drains.
        # It ends when the output closes the socket (or at cleanup).
        self._stopping = True
        await super().stop(frame)

    async def cancel(self, frame: CancelFrame):
        self._stopping = True
        await super().cancel(frame)
        await self._stop_receiving()

    async def cleanup(self):
        await super().cleanup()
        await self._stop_receiving()

    async def _stop_receiving(self):
        if self._receive_task:
            await self.cancel_task(self._receive_task)
            self._receive_task = None

    async def _receive(self):
        t = self._transport
        ws, state = t.websocket, t.state
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    text = message.get("bytes") or b""
                before = dict(state.counts)
                event = state.receive(text)
                if event is None:
                    for kind, n in state.counts.items():
                        if n > before.get(kind, 0):
                            t.bad_input(kind)
                    continue
                if isinstance(event, Media):
                    if not self._stopping:
                        await self.push_audio_frame(
                            InputAudioRawFrame(
                                audio=event.payload.tobytes(), sample_rate=TWILIO_RATE, num_channels=1
                            )
                        )
                elif isinstance(event, Dtmf):
                    await self._dtmf(event)
                elif isinstance(event, Stop):
                    t.caller_stopped = True
                    state.playout.far_end_gone()
                    break
        except Exception as e:  # the socket vanished (or broke) under us: the caller is gone either way
            logger.debug(f"Twilio call {state.call_sid}: receive ended ({type(e).__name__}: {e})")
        if not t.closing:
            await t.caller_left()

    async def _dtmf(self, event: Dtmf):
        try:
            button = KeypadEntry(event.digit)
        except ValueError:
            self._transport.state.counts["bad_dtmf"] += 1
            if self._transport.state.counts["bad_dtmf"] == 1:
                logger.warning(
                    f"Twilio call {self._transport.state.call_sid}: dropped DTMF digit {event.digit[:8]!r}"
                )
            self._transport.bad_input("bad_dtmf")
            return
        if not self._stopping:
            await self.push_frame(InputDTMFFrame(button=button))


class TwilioOutputTransport(BaseOutputTransport):
    """Sends agent audio as 20 ms media messages, paced a fixed lead ahead of Twilio's playback, with a
    mark per 80 ms and at the end of each reply; on barge-in, `clear`s what Twilio still has queued. The
    call's `TwilioPlayout` (on the stream state) keeps the account of what was sent and played."""

    def __init__(self, transport: TwilioCallTransport, params: TransportParams, **kwargs):
        super().__init__(params, **kwargs)
        self._transport = transport
        self._playout = transport.state.playout
        self._generation = 0  # bumped on each barge-in; a chunk that waited across one is dropped
        self._interrupted = asyncio.Event()
        self._unmarked_chunks = 0

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def stop(self, frame: EndFrame):
        await super().stop(frame)  # drains queued audio through write_audio_frame
        await self._mark()
        t = self._transport
        if not t.caller_stopped:
            await self._playout.wait_played()
            if not t.caller_stopped and not t.transferred:
                # Closing alone would resume the caller's TwiML after <Connect>; hang up explicitly
                # (not after a transfer: the call now belongs to the <Dial>).
                await t.hang_up()
        await t.close()

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        await self._transport.close()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        # After pipecat has emptied the audio queue: a chunk the audio task takes from the queue
        # between our `clear` and that reset would otherwise go out after the `clear`.
        if isinstance(frame, InterruptionFrame):
            await self._barge_in()

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM):
        # The audio task pushes TTSStoppedFrame on after the reply's last chunk was written, so a mark
        # sent here closes exactly that reply's audio.
        if isinstance(frame, TTSStoppedFrame) and direction == FrameDirection.DOWNSTREAM:
            await self._mark()
        await super().push_frame(frame, direction)

    async def _barge_in(self):
        self._generation += 1
        self._interrupted.set()
        self._interrupted = asyncio.Event()
        self._unmarked_chunks = 0
        clear = self._transport.state.clear()
        if clear is not None:
            await self._transport.send(clear)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        generation, interrupted = self._generation, self._interrupted
        seconds = len(frame.audio) / (2 * TWILIO_RATE)
        wait = self._playout.queued_seconds() - (LEAD_SECS - seconds)
        if wait > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(interrupted.wait(), timeout=wait)
        if generation != self._generation:
            return False  # the caller barged in while this chunk waited: never sent, never heard
        message = self._transport.state.media(ulaw_encode(frame.audio))  # encoded once, here
        self._playout.sending(seconds)
        if not await self._transport.send(message):
            return False
        self._unmarked_chunks += 1
        if self._unmarked_chunks >= MARK_EVERY_CHUNKS:
            await self._mark()
        return True

    async def _mark(self):
        # The chunks already went out one by one as pacing allowed; the mark names them as one piece.
        self._unmarked_chunks = 0
        mark = self._transport.state.mark()
        if mark is not None:
            await self._transport.send(mark)
