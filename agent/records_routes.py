"""The server's read-only view of its call records: the web page's calls list, one call's transcript
and events, and its recording. Open on loopback; behind the admin token when the server listens beyond
(agent/access.py).

    GET /api/calls?since=EPOCH&agent=&transport=&ended_by=&limit=   newest first
    GET /api/calls/{id}                                          the call and its events in order
    GET /api/calls/{id}/recording                                audio/wav (caller left, agent right)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import FileResponse
from loguru import logger

from records.model import END_REASONS

from .access import require_viewer
from .runtime import AgentRuntime

MAX_LIST = 500


def add_record_routes(app: FastAPI, runtime: AgentRuntime) -> None:
    async def read(what):
        records = runtime.records
        if records is None:
            raise HTTPException(404, "call records are off for this agent (records.enabled: false in the agent file)")
        try:
            return await records.read(what)
        except Exception as exc:
            logger.warning(f"call records could not be read: {exc!r}")
            raise HTTPException(503, f"the call records database cannot be read now ({type(exc).__name__})") from exc

    @app.get("/api/calls", dependencies=[Depends(require_viewer)])
    async def list_calls(
        since: float | None = Query(None, description="Calls started at or after this time (epoch seconds)."),
        agent: str | None = Query(None, description="Only this agent's calls."),
        transport: str | None = Query(None, description="webrtc, twilio, sip, ..."),
        ended_by: str | None = Query(None, description="One of " + ", ".join(END_REASONS) + "."),
        limit: int = Query(50, ge=1, le=MAX_LIST),
    ) -> dict:
        if ended_by is not None and ended_by not in END_REASONS:
            raise HTTPException(400, f"ended_by: {ended_by!r} is not one of {', '.join(END_REASONS)}")
        calls = await read(
            lambda store: store.list_calls(
                since=since, agent=agent, transport=transport, ended_by=ended_by, limit=limit
            )
        )
        return {"calls": [_call(info) for info in calls]}

    @app.get("/api/calls/{record_id}", dependencies=[Depends(require_viewer)])
    async def one_call(record_id: str) -> dict:
        found = await read(lambda store: store.get_call(record_id))
        if found is None:
            raise HTTPException(404, f"no call record {record_id!r}")
        info, events = found
        return {"call": _call(info), "events": [dataclasses.asdict(e) for e in events]}

    @app.get("/api/calls/{record_id}/recording", dependencies=[Depends(require_viewer)])
    async def recording(record_id: str) -> FileResponse:
        found = await read(lambda store: store.get_call(record_id))
        if found is None:
            raise HTTPException(404, f"no call record {record_id!r}")
        info, _events = found
        folder = runtime.records.config.recordings
        path = Path(info.recording) if info.recording else None
        # Only files in this agent's recordings folder are served, whatever a record says.
        if path is None or folder is None or path.resolve().parent != folder.resolve() or not path.is_file():
            raise HTTPException(404, f"call {record_id!r} has no recording here")
        return FileResponse(path, media_type="audio/wav", filename=path.name)


def _call(info) -> dict:
    call = dataclasses.asdict(info)
    call["has_recording"] = bool(info.recording)
    call.pop("recording")  # a path on the server: the page asks for /api/calls/{id}/recording instead
    return call
