"""The agent's HTTP server: the web page, WebRTC signalling on pipecat's SmallWebRTC, health and metrics.

    app = create_app(AgentRuntime(load_agent("agent.yaml")))
    serve(runtime, host="127.0.0.1", port=8080)

One browser call: the page POSTs its SDP offer (all ICE candidates included, no trickle) to
/api/offer; the answer comes back and the call's pipeline runs in the background until either side
hangs up. Closing the peer connection in the browser ends the call on the server. Keys pressed on the
page travel over the data channel as `{"type": "chroma-agents", "dtmf": "12#"}` and reach the agent as
DTMF, as a phone's would. The call itself is run by agent/lines/webrtc.py; Twilio's routes and the
SIP server are built from agent/lines/ too.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import signal
import socket
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from loguru import logger
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from processors.chroma.service import FRAME_SECONDS
from transports.addresses import E164, SIP_URI

from .access import require_admin
from .drain import Drain
from .lines.sip import sip_server
from .lines.webrtc import Busy, WebRTCCalls
from .outbound import OutboundError, OutboundRefused, place_call, route_for
from .records_routes import add_record_routes
from .runtime import STAND_IN_NOTICE, AgentRuntime, busy_label

PAGE = Path(__file__).parent / "web" / "index.html"


class Offer(BaseModel):
    """The browser's half of the WebRTC handshake."""

    # Other fields pipecat's own clients send (requestData, ...) are accepted and ignored.
    model_config = ConfigDict(extra="ignore")

    sdp: str = Field(min_length=1, description="The SDP offer, with its ICE candidates gathered.")
    type: Literal["offer"] = Field(description="Always 'offer'.")
    pc_id: str | None = Field(None, description="Renegotiation is not supported; leave it out.")


MAX_STATE_KEYS = 50
MAX_STATE_TEXT = 1000


class CallRequest(BaseModel):
    """POST /api/calls: a call for the agent to place."""

    model_config = ConfigDict(extra="forbid")

    to: StrictStr = Field(description="Whom to call: an E.164 number (+15551234567) or a SIP URI (sip:alice@host:5080).")
    from_: StrictStr | None = Field(
        None, alias="from", description="Caller ID (E.164 or SIP URI); default: the route's configured one."
    )
    state: dict[StrictStr, StrictStr | StrictInt | StrictFloat | StrictBool | None] = Field(
        default_factory=dict, description="Values the call's flow starts with, e.g. the appointment to confirm."
    )

    @field_validator("to", "from_")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not (E164.match(value) or SIP_URI.match(value)):
            raise ValueError("expected an E.164 number such as +15551234567 or a SIP URI such as sip:alice@host")
        return value

    @field_validator("state")
    @classmethod
    def _small(cls, value: dict) -> dict:
        if len(value) > MAX_STATE_KEYS:
            raise ValueError(f"{len(value)} keys; expected at most {MAX_STATE_KEYS}")
        for key, item in value.items():
            if not key.strip() or len(key) > 64:
                raise ValueError(f"key {key[:70]!r}: expected 1 to 64 characters")
            if isinstance(item, str) and len(item) > MAX_STATE_TEXT:
                raise ValueError(f"{key}: {len(item)} characters; expected at most {MAX_STATE_TEXT}")
        return value


def _bad_body(error: ValidationError) -> str:
    problems = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "body"
        value = "" if e["type"] == "missing" else f" (got {json.dumps(e.get('input'))[:60]})"
        problems.append(f"{where}: {e['msg']}{value}")
    return "; ".join(problems)


def busy_response(runtime: AgentRuntime, transport: str, reason: str) -> JSONResponse:
    runtime.metrics.call_refused(transport, busy_label(reason))
    runtime.record_refusal(transport, reason)
    logger.warning(f"{transport} call refused: {reason}")
    return JSONResponse(
        {"error": f"busy: {reason}; try again shortly", "reason": reason},
        status_code=503,
        headers={"Retry-After": "5"},
    )


def create_app(runtime: AgentRuntime, public_url: str | None = None) -> FastAPI:
    """``public_url`` (the base Twilio reaches this server at) overrides transports.twilio.public_url."""
    calls = WebRTCCalls(runtime)
    twilio = None
    if runtime.spec.transports.twilio.enabled:
        from .lines.twilio import twilio_router

        twilio = twilio_router(runtime, public_url)  # fails here, before serving, if misconfigured
    page = PAGE.read_text(encoding="utf-8")

    # Built here so that a bad SIP setup (e.g. its password variable unset) fails before serving.
    sip = sip_server(runtime) if runtime.spec.transports.sip.enabled else None

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        # Before the first call: what the agent says if its model fails is rendered while it works.
        await runtime.prepare()
        if sip is not None:
            await sip.start()
            spec = runtime.spec.transports.sip
            logger.info(
                f"SIP calls on udp {spec.host}:{sip.port} (contact {spec.public_address or spec.host}), "
                f"RTP ports {spec.rtp_ports[0]}-{spec.rtp_ports[1]}, codecs {', '.join(spec.codecs)}"
            )
        app.state.loop = asyncio.get_running_loop()  # where a signal handler starts the drain
        try:
            yield
        finally:
            runtime.shutting_down = True  # calls ended from here on end as "shutdown" in their records
            task = app.state.drain_task
            if task is not None and not task.done():  # ended at once, mid-drain: the rest is hung up below
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            if sip is not None:
                await sip.stop()
                await sip.handler.close()
            await calls.close()
            await runtime.close()

    app = FastAPI(title=f"chroma-agents: {runtime.spec.name}", lifespan=lifespan)
    app.state.runtime = runtime
    app.state.calls = calls
    if twilio is not None:
        app.include_router(twilio)
    app.state.sip = sip
    app.state.drain = Drain(runtime, transports=[sip] if sip is not None else [])
    app.state.drain_task = None
    app.state.after_drain = None  # set by serve: ends the process once drained

    @app.post("/admin/drain", status_code=202, dependencies=[Depends(require_admin)])
    async def admin_drain() -> dict:
        """Stop taking calls, let the live ones finish (up to drain_seconds), then exit."""
        begin_drain(app)
        return {"draining": True, "calls_left": app.state.drain.left, "drain_seconds": app.state.drain.seconds}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/api/agent")
    async def agent_info() -> dict:
        return {
            "name": runtime.spec.name,
            "model": runtime.model_name,
            "stand_in": runtime.stand_in,
            "notice": STAND_IN_NOTICE if runtime.stand_in else None,
        }

    @app.post("/api/offer", response_model=None)
    async def offer(request: Request) -> dict | JSONResponse:
        try:
            return await _offer(request)
        except Busy as e:
            return busy_response(runtime, "webrtc", str(e))
        except HTTPException as e:
            if e.status_code == 400:
                runtime.metrics.dropped("bad_offer")
            raise

    async def _offer(request: Request) -> dict:
        if not runtime.spec.transports.webrtc.enabled:
            raise HTTPException(503, "WebRTC calls are off for this agent (transports.webrtc.enabled: false)")
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPException(
                400, f"body: expected a JSON object {{sdp, type}}, could not parse it ({e})"
            ) from e
        if not isinstance(body, dict):
            raise HTTPException(400, f"body: expected a JSON object {{sdp, type}}, got {type(body).__name__}")
        try:
            parsed = Offer.model_validate(body)
        except ValidationError as e:
            raise HTTPException(400, _bad_body(e)) from e
        if parsed.pc_id is not None:
            raise HTTPException(400, "pc_id: renegotiating a call is not supported; leave pc_id out")
        if "m=audio" not in parsed.sdp:
            raise HTTPException(400, "sdp: expected an offer with an audio media section (m=audio)")
        if (busy := runtime.busy_reason()) is not None:
            raise Busy(busy)
        return await calls.start(parsed.sdp, parsed.type)

    @app.post("/api/calls", status_code=201, dependencies=[Depends(require_admin)], response_model=None)
    async def place(request: Request) -> JSONResponse:
        """Place a call with the agent on it: 201 {id} while it rings (400 for a bad body, 429 at an
        outbound limit, 503 when the agent is busy or the route is not set up)."""
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPException(400, f"body: expected a JSON object {{to, from?, state?}}, could not parse it ({e})") from e
        if not isinstance(body, dict):
            raise HTTPException(400, f"body: expected a JSON object {{to, from?, state?}}, got {type(body).__name__}")
        try:
            parsed = CallRequest.model_validate(body)
        except ValidationError as e:
            raise HTTPException(400, _bad_body(e)) from e
        try:
            route = route_for(runtime, parsed.to)
        except OutboundError as e:
            raise HTTPException(400, f"to: {e}") from e
        try:
            if route == "twilio":
                from .twilio_outbound import check_twilio_call

                check_twilio_call(runtime, parsed.from_)
            call_id = await place_call(runtime, parsed.to, parsed.from_, parsed.state)
        except OutboundRefused as e:
            # An outbound limit: try later. The agent's capacity: the same busy as for inbound calls.
            if e.reason.startswith("outbound limit"):
                logger.warning(f"outbound call to {parsed.to} refused: {e.reason}")
                return JSONResponse({"error": e.reason, "reason": e.reason}, status_code=429, headers={"Retry-After": "10"})
            return busy_response(runtime, "outbound", e.reason)
        except OutboundError as e:
            raise HTTPException(503, str(e)) from e
        return JSONResponse({"id": call_id}, status_code=201)

    add_record_routes(app, runtime)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "calls_active": runtime.metrics.calls_active, "model": runtime.model_name}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """For a load balancer: 200 while one more call can be taken, 503 (with the reason) while not."""
        engine = runtime.engine_state()
        reason = runtime.busy_reason(engine)
        body = {
            "ready": reason is None,
            "draining": runtime.draining,
            "sessions": runtime.sessions,
            "max_sessions": runtime.max_sessions,
            "free": max(0, runtime.max_sessions - runtime.sessions),
            "calls_active": runtime.metrics.calls_active,
            "reserved": len(runtime.reserved),
        }
        if reason is not None:
            body["reason"] = reason
        if engine is not None:
            body["engine"] = engine
            tick = engine.get("tick_seconds")
            if isinstance(tick, int | float) and not isinstance(tick, bool):
                # How far one tick runs past the 80 ms of audio it makes: above 0, callers hear gaps.
                body["engine_tick_lag_ms"] = round(max(0.0, tick - FRAME_SECONDS) * 1000, 1)
        return JSONResponse(body, status_code=200 if reason is None else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(runtime.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def begin_drain(app: FastAPI) -> asyncio.Task:
    """Start the app's drain (once; later calls return the same task); `app.state.after_drain`, if set,
    runs when it is over."""
    if app.state.drain_task is None:

        async def drain_then_exit() -> None:
            await app.state.drain.run()
            if app.state.after_drain is not None:
                app.state.after_drain()

        app.state.drain_task = asyncio.get_running_loop().create_task(drain_then_exit(), name="drain")
    return app.state.drain_task


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM drains before the server stops: new calls are refused, live ones finish
    (up to drain_seconds), and the process exits 0. A second SIGTERM, or SIGINT while draining, stops
    at once (live calls hung up); SIGINT alone stops as uvicorn does."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app
        self.drain_asked = False
        app.state.after_drain = self._drained

    def _drained(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame) -> None:
        loop = getattr(self.app.state, "loop", None)
        if sig == signal.SIGTERM and not self.drain_asked and not self.should_exit and loop is not None:
            self.drain_asked = True
            # A signal handler runs between bytecodes of whatever the loop was doing: start it there.
            loop.call_soon_threadsafe(begin_drain, self.app)
            return
        # Not force_exit: that would skip the app's shutdown, which hangs up the calls left (SIP BYE).
        super().handle_exit(sig, frame)


def serve(runtime: AgentRuntime, host: str = "127.0.0.1", port: int = 8080, public_url: str | None = None) -> None:
    """Run the server until interrupted; SIGTERM drains first (see DrainingServer)."""
    # The model, torch and pipecat leave ~400k long-lived objects; a full collection walking them
    # stalls the event loop, so every call's audio, for 300-400 ms (measured at 50-100 calls).
    # Freezing them once loaded keeps full collections to the objects calls create.
    gc.collect()
    gc.freeze()
    app = create_app(runtime, public_url)
    app.state.listen_host = host  # read by the access checks: loopback-only views need no token
    if runtime.records is not None:
        runtime.records.server = f"{socket.gethostname()}:{port}"
    DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="info"), app).run()
