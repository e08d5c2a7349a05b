"""The WebRTC line's glue: a browser's SDP offer to a running call (POST /api/offer in agent/server.py).

    calls = WebRTCCalls(runtime)
    answer = await calls.start(sdp, "offer")   # Busy when no session is free; HTTPException 400 for bad SDP
    ...
    await calls.close()                        # on shutdown: every call hung up, then cancelled

The offer (all ICE candidates included, no trickle) is answered at once; the call's pipeline runs in
the background until either side hangs up. Closing the peer connection in the browser ends the call.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import HTTPException
from loguru import logger
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection

from transports.webrtc import WebRTCLine

from ..call import Call
from ..runtime import AgentRuntime

CONNECT_TIMEOUT_SECS = 20  # an offer whose peer never connects frees its session after this
SHUTDOWN_GRACE_SECS = 3.0  # per step: hang up, then cancel


class Busy(Exception):
    """No session for one more call now; the offer is answered 503."""


class WebRTCCalls:
    """The server's WebRTC calls: each one's line (its peer connection) and the task running it."""

    def __init__(self, runtime: AgentRuntime):
        self.runtime = runtime
        self.active: dict[str, tuple[WebRTCLine, Call, asyncio.Task]] = {}

    async def start(self, sdp: str, sdp_type: str) -> dict:
        """The SDP answer; HTTPException 400 for an offer aiortc cannot use, Busy when no session is free."""
        connection = SmallWebRTCConnection(connection_timeout_secs=CONNECT_TIMEOUT_SECS)
        try:
            await connection.initialize(sdp=sdp, type=sdp_type)
        except Exception as e:  # aiortc raises several kinds for SDP it cannot use
            with contextlib.suppress(Exception):
                await connection.disconnect()
            raise HTTPException(400, f"sdp: not a usable WebRTC offer ({type(e).__name__}: {e})") from e
        # Asked again after the awaits above: other offers may have taken the last session meanwhile.
        if (busy := self.runtime.busy_reason()) is not None:
            with contextlib.suppress(Exception):
                await connection.disconnect()
            raise Busy(busy)
        try:
            line = WebRTCLine(connection, on_bad_input=self.runtime.metrics.dropped)
            call = self.runtime.new_call(line)
            call.identify({"pc_id": connection.pc_id})
        except Exception:
            with contextlib.suppress(Exception):
                await connection.disconnect()
            raise

        @line.event_handler("on_client_disconnected")
        async def _caller_left(_line, _client):
            # Nothing is left to hear the rest of the reply: cancel rather than drain.
            await call.cancel("caller left")

        pc_id = connection.pc_id
        task = asyncio.create_task(self._run(pc_id, line, call), name=f"call-{pc_id}")
        self.active[pc_id] = (line, call, task)
        return connection.get_answer()

    async def _run(self, pc_id: str, line: WebRTCLine, call: Call) -> None:
        try:
            await call.run()
        except Exception:  # one call's failure is logged and freed; the server and other calls go on
            logger.exception(f"call {call.stats.call_id} failed")
        finally:
            self.active.pop(pc_id, None)
            with contextlib.suppress(Exception):
                await line.hang_up()

    async def close(self) -> None:
        """Hang up every call; a reply still being spoken gets a short grace, then the call is cancelled."""
        calls = list(self.active.values())
        for _line, call, _task in calls:
            with contextlib.suppress(Exception):
                await call.hang_up()
        pending = {task for _line, _call, task in calls}
        if pending:
            _done, pending = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE_SECS)
        for _line, call, task in calls:
            if task in pending:
                with contextlib.suppress(Exception):
                    await call.cancel("server shutting down")
        if pending:
            _done, pending = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE_SECS)
        for task in pending:  # a pipeline that ignored its cancel: stop waiting on it
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for line, _call, _task in calls:
            with contextlib.suppress(Exception):
                await line.hang_up()
