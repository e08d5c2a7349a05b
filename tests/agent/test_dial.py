"""`chroma-agent dial` against SIPp as the callee, and the outbound limits of place_call: outbound
max_calls, per_minute, and the agent's max_sessions shared with inbound calls."""

import asyncio
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.cli import main
from agent.outbound import OutboundRefused, outbound_book, place_call, placed_call
from agent.runtime import AgentRuntime
from agent.spec import AgentFileError, load_agent
from processors.audio import ulaw_encode
from processors.audio_io import read_audio, to_pcm16
from tests.transports.sip.test_outbound import SCENARIOS, free_port

ROOT = Path(__file__).resolve().parents[2]
SIPP = shutil.which("sipp")
HOST = "127.0.0.1"
needs_sipp = pytest.mark.skipif(SIPP is None, reason="sipp is not installed (apt-get install sip-tester)")


@pytest.fixture(autouse=True)
def engine_keeps_up(monkeypatch):
    """The engine's real-time verdict (measured on this shared, loaded CPU) would refuse calls as busy;
    these tests are about the calls and the limits, not the engine's speed."""
    monkeypatch.setattr(AgentRuntime, "engine_state", lambda self: None)


def agent_file(folder: Path, extra: str = "") -> Path:
    rtp_first = random.randrange(30000, 59000, 2)
    path = folder / "agent.yaml"
    path.write_text(
        f"name: dial test agent\nmodel: tiny\nvoice: {ROOT / 'examples/voices/demo'}\n"
        "turn: {detector: silence, silence_secs: 0.5}\nresponse: {max_seconds: 1}\n"
        f"transports:\n  sip: {{host: {HOST}, rtp_ports: [{rtp_first}, {rtp_first + 99}]}}\n" + extra
    )
    return path


def start_callee(scenario: str, folder: Path, *options: str) -> tuple[subprocess.Popen, int]:
    pcm = to_pcm16(read_audio(ROOT / "tests/fixtures/answering/human_hello.wav", 8000))
    (folder / "callee.ulaw").write_bytes(ulaw_encode(pcm))
    port = free_port()
    process = subprocess.Popen(
        [SIPP, "-sf", str(SCENARIOS / scenario), "-i", HOST, "-p", str(port), "-mp", str(free_port(4)), "-m", "1",
         "-nostdin", "-timeout", "30s", "-timeout_error", *options],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return process, port


def finish(process: subprocess.Popen) -> int:
    try:
        return process.wait(timeout=40)
    finally:
        if process.poll() is None:
            process.kill()


@needs_sipp
def test_dial_an_answered_call(tmp_path, capsys):
    process, port = start_callee("uas_answer_speak.xml", tmp_path, "-d", "6000")
    code = main(
        ["dial", str(agent_file(tmp_path)), "--to", f"sip:callee@{HOST}:{port}", "--state", "order=A-1042"]
    )
    out = capsys.readouterr().out
    assert finish(process) == 0
    assert code == 0, out
    assert f"dialling sip:callee@{HOST}:{port} over sip" in out
    assert "answered_by answered_by=human" in out
    assert out.rstrip().splitlines()[-1].endswith("answered, human (the callee hung up)")


@needs_sipp
def test_dial_hangs_up_at_its_timeout(tmp_path, capsys):
    # A callee that says hello and stays on until the caller hangs up (its scenario waits for our BYE).
    process, port = start_callee("uas_machine.xml", tmp_path)
    code = main(["dial", str(agent_file(tmp_path)), "--to", f"sip:callee@{HOST}:{port}", "--timeout", "5"])
    out = capsys.readouterr().out
    assert finish(process) == 0  # our BYE came
    assert code == 0, out
    assert "timeout after_secs=5.0" in out
    assert out.rstrip().splitlines()[-1].endswith("answered, human")


@needs_sipp
def test_dial_a_busy_line_exits_1(tmp_path, capsys):
    process, port = start_callee("uas_busy.xml", tmp_path)
    code = main(["dial", str(agent_file(tmp_path)), "--to", f"sip:callee@{HOST}:{port}"])
    out = capsys.readouterr().out
    assert finish(process) == 0
    assert code == 1
    assert out.rstrip().splitlines()[-1].endswith("busy (SIP 486 Busy Here)")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--to", "hello"], "neither a SIP URI"),
        (["--to", "sips:a@127.0.0.1"], "sips: needs TLS"),
        (["--to", "sip:a@127.0.0.1", "--state", "novalue"], "--state 'novalue' is not key=value"),
        (["--to", "sip:a@127.0.0.1", "--timeout", "0"], "--timeout 0.0"),
    ],
)
def test_dial_usage_errors_exit_2(tmp_path, capsys, flags, message):
    assert main(["dial", str(agent_file(tmp_path)), *flags]) == 2
    assert message in capsys.readouterr().err


def test_outbound_settings_are_checked_when_the_file_loads(tmp_path):
    with pytest.raises(AgentFileError, match="on_machine is leave_message but message is empty"):
        load_agent(agent_file(tmp_path, "outbound: {on_machine: leave_message}\n"))
    path = agent_file(tmp_path)
    path.write_text(path.read_text().replace("rtp_ports", "trunk: {address: 'sip:bad host'}, rtp_ports"))
    with pytest.raises(AgentFileError, match="expected host or host:port"):
        load_agent(path)


async def test_a_trunk_password_missing_from_the_environment_fails_the_call_naming_it(
    tmp_path, tiny_model, monkeypatch
):
    monkeypatch.delenv("NO_SUCH_TRUNK_PASSWORD", raising=False)
    path = agent_file(tmp_path)
    trunk = (
        "trunk: {address: '127.0.0.1:5999', username: agent, password_env: NO_SUCH_TRUNK_PASSWORD}, rtp_ports"
    )
    path.write_text(path.read_text().replace("rtp_ports", trunk))
    runtime = AgentRuntime(load_agent(path), model=tiny_model)
    placed = placed_call(runtime, await place_call(runtime, "+15551230042"))
    assert await placed.wait(5) == "failed"
    assert "NO_SUCH_TRUNK_PASSWORD" in placed.detail and "is not set" in placed.detail
    assert runtime.sessions == 0


# -- limits ------------------------------------------------------------------------------------------


class Ringing:
    """A route whose calls ring until told how they end: a stand-in for the network, so the limits are
    tested without placing real calls (the SIP route itself is tested against SIPp above)."""

    def __init__(self):
        self.go = asyncio.Event()

    async def __call__(self, runtime, placed):
        await self.go.wait()
        placed.finish("no-answer", "stand-in route")


async def test_outbound_max_calls(tmp_path, tiny_model):
    runtime = AgentRuntime(load_agent(agent_file(tmp_path, "outbound: {max_calls: 2}\n")), model=tiny_model)
    route = Ringing()
    ids = [await place_call(runtime, "sip:a@127.0.0.1", dialer=route) for _ in range(2)]
    with pytest.raises(OutboundRefused, match="2 of outbound.max_calls 2"):
        await place_call(runtime, "sip:a@127.0.0.1", dialer=route)
    route.go.set()
    for call_id in ids:
        assert await placed_call(runtime, call_id).wait(5) == "no-answer"
    await place_call(runtime, "sip:a@127.0.0.1", dialer=route)  # room again once they ended


async def test_outbound_per_minute(tmp_path, tiny_model):
    runtime = AgentRuntime(load_agent(agent_file(tmp_path, "outbound: {per_minute: 3}\n")), model=tiny_model)
    route = Ringing()
    route.go.set()
    for _ in range(3):
        await placed_call(runtime, await place_call(runtime, "sip:a@127.0.0.1", dialer=route)).wait(5)
    with pytest.raises(OutboundRefused, match="3 calls placed in the last minute"):
        await place_call(runtime, "sip:a@127.0.0.1", dialer=route)
    book = outbound_book(runtime)
    book.placed_times[0] -= 61  # the first call is now more than a minute old
    await place_call(runtime, "sip:a@127.0.0.1", dialer=route)


async def test_outbound_calls_share_the_agents_capacity_with_inbound_ones(tmp_path, tiny_model):
    runtime = AgentRuntime(load_agent(agent_file(tmp_path, "max_sessions: 1\n")), model=tiny_model)
    route = Ringing()
    call_id = await place_call(runtime, "sip:a@127.0.0.1", dialer=route)
    # While it rings it holds the one session: an inbound call (SIP 486, Twilio <Reject>) is refused...
    assert runtime.busy_reason().startswith("at capacity: 1 of max_sessions 1")
    # ...and so is a second outbound call.
    with pytest.raises(OutboundRefused, match="at capacity"):
        await place_call(runtime, "sip:b@127.0.0.1", dialer=route)
    route.go.set()
    await placed_call(runtime, call_id).wait(5)
    assert runtime.sessions == 0 and runtime.busy_reason() is None
    # An inbound call holding the session refuses an outbound one the same way.
    assert runtime.reserve("inbound-call") is None
    with pytest.raises(OutboundRefused, match="at capacity"):
        await place_call(runtime, "sip:b@127.0.0.1", dialer=route)
