"""The Twilio line's glue: the number's voice webhook and the Media Stream socket on the agent's server.

    app.include_router(twilio_router(runtime, "https://agent.example.com"))

POST /twilio/voice answers a signed webhook with `<Connect><Stream>` to wss://<public>/twilio/media
(or `<Reject reason="busy"/>` at max_calls); WS /twilio/media checks the upgrade's signature and the
per-call token from `start`, then runs the call's pipeline until either side hangs up. The token is
signed with a key derived from the auth token, so any server of the agent verifies it: behind a load
balancer the webhook and the stream may land on different servers. While the server drains, the
webhook answers 503 (the balancer retries it elsewhere).

Calls the agent places (agent/twilio_outbound.py) stream through the same socket; their status
callbacks (POST /twilio/outbound/status) and answering-machine verdicts (POST /twilio/outbound/amd)
are checked for Twilio's signature like the webhook and recorded on the placed call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
from urllib.parse import parse_qsl, urlsplit

from fastapi import APIRouter, Request, Response, WebSocket
from loguru import logger
from twilio.twiml.voice_response import VoiceResponse

from transports.twilio import TwilioCallTransport
from transports.twilio_webhook import StreamTokens, connect_twiml, public_url, verify_signature
from transports.twilio_wire import Start, Stop, TwilioStreamState

from ..runtime import AgentRuntime, busy_label
from ..twilio_outbound import TwilioDialOut

START_TIMEOUT_SECS = 10  # Twilio sends `connected` and `start` right after the upgrade
MAX_FORM_BYTES = 64 * 1024  # a voice webhook's form is a few hundred bytes
TWIML = "application/xml"
DEFAULT_API_URL = "https://api.twilio.com"
STREAM_TOKEN_LABEL = b"chroma-agents twilio stream token"


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


def stream_token_secret(auth_token: str) -> bytes:
    """The key stream tokens are signed with, derived from the auth token: every server of the agent
    has it, so the webhook and the media socket may land on different servers behind a balancer.
    Derived rather than the token itself, so a stream token reveals nothing usable as a Twilio signature."""
    return hmac.new(auth_token.encode(), STREAM_TOKEN_LABEL, hashlib.sha256).digest()


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
    if rest_client is None and account_sid and spec.api_url != DEFAULT_API_URL:
        rest_client = _rest_client(spec.api_url, account_sid, auth_token)
    dial_out = None
    if account_sid:
        dial_out = runtime.twilio_dial_out = TwilioDialOut(
            runtime, account_sid=account_sid, auth_token=auth_token, public_base=base, stream_url=stream_url, agent=agent
        )
    tokens = StreamTokens(stream_token_secret(auth_token))
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
        if runtime.draining:
            # 503, not <Reject>: behind a load balancer the webhook is retried on another server.
            logger.warning(f"Twilio call {call_sid}: answered 503, this server is draining")
            runtime.metrics.call_refused("twilio", "draining")
            return Response("draining", status_code=503, headers={"Retry-After": "5"})
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
        # A call the agent placed: its token was issued for our id of the call, not the call SID.
        leg = dial_out.leg_for_stream(start.call_sid) if dial_out is not None else None
        # redeem: a token opens one stream, once; a replay within its lifetime is refused like a forgery
        if params.get("agent") != agent or not (
            dial_out.redeem(leg, params.get("token"))
            if leg is not None
            else tokens.redeem(params.get("token"), start.call_sid, agent)
        ):
            runtime.metrics.dropped("twilio_bad_token")
            logger.warning(f"Twilio call {start.call_sid}: stream refused, its token does not check")
            await ws.close(code=1008)
            return
        if start.call_sid in runtime.calls:  # a second stream for a live call: keep the first
            runtime.metrics.dropped("twilio_duplicate_call")
            await ws.close(code=1008)
            return
        # The webhook said yes, but others may have got in since: never a call beyond capacity. A placed
        # call holds its session from the moment it was dialled; a drain begun since the webhook does not
        # refuse a call: the caller was promised it.
        if leg is None and (
            runtime.active_calls("twilio") >= spec.max_calls or runtime.busy_reason(promised=True) is not None
        ):
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
            transport,
            call_id=start.call_sid,
            screen=dial_out.screen(leg) if leg is not None else None,  # who answered: Twilio's verdict
        )
        if leg is not None:
            dial_out.started(leg, call)  # the flow starts with the values the call was placed with
        else:
            call.flow_state["caller_number"] = params.get("caller", "")[:64]
        call.identify({"call_sid": start.call_sid, "stream_sid": start.stream_sid}, caller=params.get("caller"))

        @transport.event_handler("on_client_disconnected")
        async def _caller_left(_transport, _ws):
            # Nothing is left to hear the rest of the reply: cancel rather than drain.
            await call.cancel("caller left")

        await call.run()

    async def _signed_form(request: Request, path: str) -> dict[str, str] | None:
        """The callback's form when Twilio signed it (over the public URL with its query), else None."""
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return None
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        url = public_url(base, path, request.url.query)
        if not verify_signature(auth_token, url, form, request.headers.get("x-twilio-signature")):
            runtime.metrics.dropped("twilio_bad_signature")
            return None
        return form

    @router.post("/twilio/outbound/status")
    async def outbound_status(request: Request) -> Response:
        form = await _signed_form(request, "/twilio/outbound/status")
        if form is None:
            return Response(status_code=403)
        if dial_out is None or not dial_out.status(request.query_params.get("placed"), form):
            logger.info(f"Twilio status {form.get('CallStatus')!r} for a call not placed here (or over): ignored")
        return Response(status_code=204)

    @router.post("/twilio/outbound/amd")
    async def outbound_amd(request: Request) -> Response:
        form = await _signed_form(request, "/twilio/outbound/amd")
        if form is None:
            return Response(status_code=403)
        if dial_out is None or not dial_out.amd(request.query_params.get("placed"), form):
            logger.info(f"Twilio AnsweredBy {form.get('AnsweredBy')!r} for a call not placed here (or over): ignored")
        return Response(status_code=204)

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


def _rest_client(api_url: str, account_sid: str, auth_token: str):
    """A ``twilio.rest.Client`` whose requests go to ``api_url`` (a regional edge, a local stand-in)
    instead of api.twilio.com, for hang-up and transfer."""
    from twilio.http.http_client import TwilioHttpClient
    from twilio.rest import Client

    class _At(TwilioHttpClient):
        def request(self, method, url, *args, **kwargs):
            return super().request(method, url.replace(DEFAULT_API_URL, api_url, 1), *args, **kwargs)

    return Client(account_sid, auth_token, http_client=_At())
