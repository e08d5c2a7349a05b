"""Twilio phone calls on the agent's server: the number's voice webhook and the Media Stream socket.

    app.include_router(twilio_router(runtime, "https://agent.example.com"))

POST /twilio/voice answers a signed webhook with `<Connect><Stream>` to wss://<public>/twilio/media
(or `<Reject reason="busy"/>` at max_calls); WS /twilio/media checks the upgrade's signature and the
per-call token from `start`, then runs the call's pipeline until either side hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from urllib.parse import parse_qsl, urlsplit

from fastapi import APIRouter, Request, Response, WebSocket
from loguru import logger
from twilio.twiml.voice_response import VoiceResponse

from transports.twilio import TwilioCallTransport
from transports.twilio_webhook import StreamTokens, connect_twiml, public_url, verify_signature
from transports.twilio_wire import SAMPLE_RATE, Start, Stop, TwilioStreamState

from .runtime import AgentRuntime, busy_label

START_TIMEOUT_SECS = 10  # Twilio sends `connected` and `start` right after the upgrade
MAX_FORM_BYTES = 64 * 1024  # a voice webhook's form is a few hundred bytes
TWIML = "application/xml"


class TwilioConfigError(ValueError):
    """Twilio calls are enabled but the server cannot check Twilio's signatures."""


def _settings(runtime: AgentRuntime, public_base: str | None) -> tuple[str, str, str | None]:
    spec = runtime.spec.transports.twilio
    auth_token = spec.auth_token or os.environ.get("TWILIO_AUTH_TOKEN")
    if not auth_token:
        raise TwilioConfigError(
            "transports.twilio.enabled is true but no auth token is set: set transports.twilio.auth_token "
            "or the TWILIO_AUTH_TOKEN environment variable (Twilio signs every request with it)"
        )
    base = public_base or spec.public_url
    if not base:
        raise TwilioConfigError(
            "transports.twilio.enabled is true but no public URL is set: set transports.twilio.public_url "
            "or pass --public-url https://your.host (signatures are checked against the URL Twilio used)"
        )
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise TwilioConfigError(f"public_url is {base!r}; expected an absolute http(s) URL with no query")
    account_sid = spec.account_sid or os.environ.get("TWILIO_ACCOUNT_SID")
    return auth_token, base, account_sid


def twilio_router(runtime: AgentRuntime, public_base: str | None = None, *, rest_client=None) -> APIRouter:
    """Routes for Twilio calls. ``public_base`` overrides ``transports.twilio.public_url``; ``rest_client``
    (a ``twilio.rest.Client``) replaces the one built from the account SID and auth token."""
    auth_token, base, account_sid = _settings(runtime, public_base)
    spec = runtime.spec.transports.twilio
    voice_url = public_url(base, "/twilio/voice")
    # Twilio only opens wss:// streams; behind a TLS terminator the server itself may see ws:// or http://,
    # so the signed URL is built from the public base, not from the request.
    parts = urlsplit(base)
    stream_url = public_url(f"wss://{parts.netloc}{parts.path}", "/twilio/media")
    agent = runtime.spec.name.replace("|", "/")  # "|" separates the fields a stream token signs
    tokens = StreamTokens(secrets.token_bytes(32))
    router = APIRouter()

    @router.post("/twilio/voice")
    async def voice(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return Response(status_code=413)
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        if not verify_signature(auth_token, voice_url, form, request.headers.get("x-twilio-signature")):
            runtime.metrics.dropped("twilio_bad_signature")
            return Response(status_code=403)
        call_sid = form.get("CallSid", "")
        busy = runtime.busy_reason()
        if busy is None and runtime.active_calls("twilio") >= spec.max_calls:
            busy = f"at max_calls: {spec.max_calls} Twilio calls already"
        if busy is not None:
            logger.warning(f"Twilio call {call_sid}: rejected as busy ({busy})")
            runtime.metrics.call_refused("twilio", busy_label(busy))
            runtime.record_refusal(
                "twilio", busy, transport_ids={"call_sid": call_sid}, caller=form.get("From"), callee=form.get("To")
            )
            response = VoiceResponse()
            response.reject(reason="busy")
            return Response(str(response), media_type=TWIML)
        try:
            token = tokens.issue(call_sid, agent)
        except ValueError:
            return Response(
                f"form field CallSid is {call_sid[:40]!r}; expected a Twilio call SID", status_code=400
            )
        twiml = connect_twiml(stream_url, agent=agent, token=token, call_sid=call_sid, caller=form.get("From", ""))
        return Response(twiml, media_type=TWIML)

    @router.websocket("/twilio/media")
    async def media(ws: WebSocket) -> None:
        if not verify_signature(auth_token, stream_url, {}, ws.headers.get("x-twilio-signature")):
            runtime.metrics.dropped("twilio_bad_signature")
            await ws.close(code=1008)  # before accept: the upgrade is answered with HTTP 403
            return
        await ws.accept()
        try:
            await _media(ws)
        except Exception:  # one call's failure is logged; the server and other calls go on
            logger.exception("Twilio media stream failed")
        finally:
            with contextlib.suppress(Exception):
                await ws.close()

    async def _media(ws: WebSocket) -> None:
        state = TwilioStreamState()
        start = await _read_start(ws, state)
        if start is None:
            return
        params = start.custom_parameters
        # redeem: a token opens one stream, once; a replay within its lifetime is refused like a forgery
        if params.get("agent") != agent or not tokens.redeem(params.get("token"), start.call_sid, agent):
            runtime.metrics.dropped("twilio_bad_token")
            logger.warning(f"Twilio call {start.call_sid}: stream refused, its token does not check")
            await ws.close(code=1008)
            return
        if start.call_sid in runtime.calls:  # a second stream for a live call: keep the first
            runtime.metrics.dropped("twilio_duplicate_call")
            await ws.close(code=1008)
            return
        # The webhook said yes, but others may have got in since: never a call beyond capacity.
        if runtime.active_calls("twilio") >= spec.max_calls or runtime.busy_reason() is not None:
            runtime.metrics.dropped("twilio_busy")
            await ws.close(code=1013)
            return
        transport = TwilioCallTransport(
            ws,
            state,
            on_bad_input=lambda kind: runtime.metrics.dropped("twilio_" + kind),
            rest_client=rest_client,
            account_sid=account_sid,
            auth_token=auth_token,
            name=f"twilio-{start.call_sid}",
        )
        call = runtime.new_call(
            transport, kind="twilio", call_id=start.call_sid, in_rate=SAMPLE_RATE, out_rate=SAMPLE_RATE
        )

        call.flow_state["caller_number"] = params.get("caller", "")[:64]
        call.identify({"call_sid": start.call_sid, "stream_sid": start.stream_sid}, caller=params.get("caller"))

        @transport.event_handler("on_client_disconnected")
        async def _caller_left(_transport, _ws):
            # Nothing is left to hear the rest of the reply: cancel rather than drain.
            await call.cancel("caller left")

        await call.run()

    async def _read_start(ws: WebSocket, state: TwilioStreamState) -> Start | None:
        """Messages up to `start` (normally just `connected`); None if it never came."""
        try:
            async with asyncio.timeout(START_TIMEOUT_SECS):
                while True:
                    message = await ws.receive()
                    if message["type"] == "websocket.disconnect":
                        return None
                    before = dict(state.counts)
                    event = state.receive(message.get("text") or message.get("bytes") or b"")
                    for kind, n in state.counts.items():
                        if n > before.get(kind, 0):
                            runtime.metrics.dropped("twilio_" + kind)
                    if isinstance(event, Start):
                        return event
                    if isinstance(event, Stop):
                        return None
        except TimeoutError:
            runtime.metrics.dropped("twilio_no_start")
            logger.warning(f"Twilio stream sent no `start` within {START_TIMEOUT_SECS} s; closing it")
            await ws.close(code=1008)
            return None

    logger.info(f"Twilio calls: voice webhook {voice_url}, media stream {stream_url}")
    return router
