"""The records kept for each call: one row of call facts, and its ordered events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Why a call ended (CallInfo.end_reason).
END_REASONS = ("caller_hung_up", "agent_ended", "transferred", "busy", "error", "crash", "shutdown")


@dataclass
class CallInfo:
    call_id: str
    agent: str
    transport: str  # "webrtc" | "twilio" | "sip" | "file" | ...
    started_at: float  # epoch seconds
    transport_ids: dict[str, str] = field(default_factory=dict)  # e.g. {"call_sid": ..., "sip_call_id": ...}
    caller: str | None = None
    callee: str | None = None
    voice: str | None = None
    direction: str = "inbound"
    answered_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None  # one of END_REASONS
    end_detail: str | None = None  # e.g. the transfer target, the error message
    recording: str | None = None  # path of the recording file
    # The server process that took the call (e.g. host:port): with several servers on one database, a
    # restarted server ends only the calls it left open.
    server: str | None = None


@dataclass
class CallEvent:
    call_id: str
    seq: int  # order within the call, from 0
    at: float  # epoch seconds
    kind: str
    data: dict[str, Any] = field(default_factory=dict)  # JSON-able
