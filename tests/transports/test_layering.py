"""transports/ stands below agent/: it imports nothing from it. And each of the four lines the agent
runs calls on is a transports.line.Line, with the kind and rates its calls are counted and run at."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection

from tests.transports.sip.test_rtp import pool
from transports.file import FileCallTransport
from transports.line import Line, Playout
from transports.sip.rtp import RtpSession
from transports.sip.transport import SipCallTransport
from transports.twilio import TwilioCallTransport
from transports.twilio_wire import TwilioStreamState
from transports.webrtc import WebRTCLine

ROOT = Path(__file__).resolve().parents[2]
TRANSPORTS = ROOT / "transports"


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, in functions too, relative ones resolved."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found += [(node.lineno, f"{module}.{alias.name}" if not node.module else module) for alias in node.names]
    return found


def test_the_import_finder_sees_imports_in_functions_and_relative_ones(tmp_path):
    probe = tmp_path / "transports" / "sip" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "def f():\n    from agent.runtime import AgentRuntime\nfrom ..agent import x\nfrom .rtp import RtpSession\n"
        "import agent\n",
        encoding="utf-8",
    )
    assert sorted(imported_modules(probe, tmp_path)) == [
        (2, "agent.runtime"),
        (3, "transports.agent"),
        (4, "transports.sip.rtp"),
        (5, "agent"),
    ]


def test_no_module_under_transports_imports_from_agent():
    offending = [
        f"{path.relative_to(TRANSPORTS.parent)}:{line}: imports {module}"
        for path in sorted(TRANSPORTS.rglob("*.py"))
        for line, module in imported_modules(path)
        if module == "agent" or module.startswith("agent.")
    ]
    assert offending == []


def twilio_stream() -> TwilioStreamState:
    stream = "MZ" + "1" * 32
    state = TwilioStreamState()
    start = {"streamSid": stream, "callSid": "CA" + "2" * 32, "accountSid": "AC" + "3" * 32, "tracks": ["inbound"]}
    state.receive(json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": stream, "start": start}))
    return state


async def test_each_line_is_a_line_with_its_kind_and_rates():
    session = await RtpSession.open(pool(), name="layering")
    connection = SmallWebRTCConnection()
    try:
        lines = [
            FileCallTransport(np.zeros(160, np.int16), 8000, output_rate=8000, in_rate=8000),
            TwilioCallTransport(object(), twilio_stream()),  # the socket is not used until the call starts
            SipCallTransport(session, name="sip-layering"),
            WebRTCLine(connection),
        ]
        for line in lines:
            assert isinstance(line, Line), type(line).__name__
            assert isinstance(line.playout, Playout), type(line).__name__
        assert [(line.kind, line.in_rate, line.out_rate) for line in lines] == [
            ("file", 8000, 8000),
            ("twilio", 8000, 8000),
            ("sip", 8000, 8000),
            ("webrtc", 16000, 48000),
        ]
        assert [line.can_transfer for line in lines] == [True, True, True, False]
        # Lines that play as they write have nothing unplayed; the WebRTC line refuses a transfer.
        assert lines[0].playout.unplayed_seconds() == 0.0 and lines[3].playout.unplayed_seconds() == 0.0
        assert not await lines[3].transfer("+15551234567")
    finally:
        session.close()
        await connection.disconnect()
