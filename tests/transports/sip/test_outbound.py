"""Outbound SIP calls from an agent (tiny model) to SIPp playing the callee (scenarios/uas_*.xml): a
person who answers and speaks, busy, no answer (CANCEL at the ring timeout), a trunk's 407 challenge,
and an answering machine (a long recorded greeting, then a beep) hung up on or left a message.

SIPp's exit code says whether every message it expected arrived in order (the ACK for a 486, the
CANCEL, the digest it verified, our BYE); the placed call's events say what the agent decided."""

import asyncio
import hashlib
import random
import re
import shutil
import time
from pathlib import Path

import pytest

from agent.outbound import place_call, placed_call
from agent.runtime import AgentRuntime
from agent.spec import load_agent
from processors.audio import ulaw_encode
from processors.audio_io import read_audio, to_pcm16
from tests.agent.test_sip_call import free_port

ROOT = Path(__file__).resolve().parents[3]
SCENARIOS = Path(__file__).parent / "scenarios"
FIXTURES = ROOT / "tests/fixtures/answering"
SIPP = shutil.which("sipp")
HOST = "127.0.0.1"
pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp is not installed (apt-get install sip-tester)")


@pytest.fixture(autouse=True)
def engine_keeps_up(monkeypatch):
    """The engine's real-time verdict (measured on this shared, loaded CPU) would refuse calls as busy;
    these tests are about the calls, and the capacity rules have their own tests (tests/agent/test_dial.py)."""
    monkeypatch.setattr(AgentRuntime, "engine_state", lambda self: None)


def make_runtime(folder: Path, model, *, outbound: str = "{}", sip_extra: str = "") -> AgentRuntime:
    rtp_first = random.randrange(30000, 59000, 2)
    path = folder / "agent.yaml"
    path.write_text(
        f"name: outbound test agent\nmodel: tiny\nvoice: {ROOT / 'examples/voices/demo'}\n"
        "turn: {detector: silence, silence_secs: 0.5}\nresponse: {max_seconds: 1}\n"
        f"transports:\n  sip: {{host: {HOST}, rtp_ports: [{rtp_first}, {rtp_first + 99}]{sip_extra}}}\n"
        f"outbound: {outbound}\n"
    )
    return AgentRuntime(load_agent(path), model=model)


def callee_audio(folder: Path, fixture: str) -> None:
    """The callee's words for SIPp's rtp_stream: a committed recording as raw mu-law at 8 kHz."""
    pcm = to_pcm16(read_audio(FIXTURES / fixture, 8000))
    (folder / "callee.ulaw").write_bytes(ulaw_encode(pcm))


class Callee:
    """SIPp as the callee, running one scenario in the background."""

    def __init__(self, scenario: str, folder: Path, *options: str, timeout: int = 40):
        self.port = free_port()
        self.command = [
            SIPP, "-sf", str(SCENARIOS / scenario), "-i", HOST, "-p", str(self.port), "-mp", str(free_port(4)),
            "-m", "1", "-nostdin", "-timeout", f"{timeout}s", "-timeout_error", "-trace_err", *options,
        ]  # fmt: skip
        self.folder = folder
        self.timeout = timeout
        self.process = None

    @property
    def uri(self) -> str:
        return f"sip:callee@{HOST}:{self.port}"

    async def __aenter__(self):
        self.process = await asyncio.create_subprocess_exec(
            *self.command, cwd=self.folder, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        await asyncio.sleep(0.3)  # its socket is bound
        return self

    async def result(self) -> tuple[int, str]:
        try:
            output, _ = await asyncio.wait_for(self.process.communicate(), self.timeout + 15)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise
        errors = "\n".join(p.read_text(errors="replace")[-3000:] for p in self.folder.glob("*_errors.log"))
        return self.process.returncode, output.decode(errors="replace")[-3000:] + errors

    async def __aexit__(self, *exc):
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


def events(placed) -> dict[str, dict]:
    return {kind: data for _at, kind, data in placed.events}


async def test_a_person_answers_and_the_agent_answers_their_hello(tmp_path, tiny_model):
    runtime = make_runtime(tmp_path, tiny_model)
    callee_audio(tmp_path, "human_hello.wav")
    async with Callee("uas_answer_speak.xml", tmp_path, "-d", "7000") as callee:
        call_id = await place_call(runtime, callee.uri, state={"appointment": "Tuesday 10:00"})
        placed = placed_call(runtime, call_id)
        assert await placed.wait(40) == "answered"
        code, output = await callee.result()
    assert code == 0, output
    seen = events(placed)
    assert "ringing" in seen and "answered" in seen
    assert placed.answered_by == "human", seen["answered_by"]
    assert placed.detail == "the callee hung up"
    assert placed.call.flow_state["appointment"] == "Tuesday 10:00"
    # The greeting was held back until the decision, then handed on: the agent replied to it.
    assert placed.call.stats.turns >= 1
    kinds = [kind for _at, kind, _data in placed.call.timeline]
    assert kinds.index("answered_by") < kinds.index("agent_text")
    assert runtime.sessions == 0  # the session went back when the call ended


async def test_early_media_is_not_heard(tmp_path, tiny_model):
    runtime = make_runtime(tmp_path, tiny_model)
    callee_audio(tmp_path, "human_hello.wav")
    # Before it answers, the callee plays 3 s of a machine's greeting as early media (183 with SDP): heard,
    # it would make the detector call the person who then answers "Hello?" a machine.
    early = to_pcm16(read_audio(FIXTURES / "machine_beep.wav", 8000))
    (tmp_path / "early.ulaw").write_bytes(ulaw_encode(early[: 3 * 8000]))
    async with Callee("uas_early_media.xml", tmp_path, "-d", "4000") as callee:
        placed = placed_call(runtime, await place_call(runtime, callee.uri))
        assert await placed.wait(40) == "answered"
        code, output = await callee.result()
    assert code == 0, output
    assert events(placed)["progress"]["status"] == 183
    assert placed.answered_by == "human"


GREETING_FLOW = """
initial_node: greet
nodes:
  greet:
    respond_immediately: true
    task_messages: [{role: developer, content: Say you are calling about the appointment.}]
"""


@pytest.mark.parametrize("fixture, scenario, who", [
    ("human_hello.wav", "uas_answer_speak.xml", "human"),
    ("machine_beep.wav", "uas_machine.xml", "machine"),
])  # fmt: skip
async def test_a_flow_that_speaks_first_waits_for_a_person(tmp_path, tiny_model, fixture, scenario, who):
    (tmp_path / "flow.yaml").write_text(GREETING_FLOW)
    runtime = make_runtime(tmp_path, tiny_model, outbound="{on_machine: hang_up}\nflow: flow.yaml")
    callee_audio(tmp_path, fixture)
    async with Callee(scenario, tmp_path, "-d", "5000") as callee:
        placed = placed_call(runtime, await place_call(runtime, callee.uri))
        assert await placed.wait(40) == "answered"
        await callee.result()
    assert placed.answered_by == who
    kinds = [kind for _at, kind, _data in placed.call.timeline]
    if who == "human":  # the first node starts (and speaks) only once a person has answered
        assert "node" in kinds and kinds.index("answered_by") < kinds.index("node")
    else:  # a machine never hears the flow
        assert "node" not in kinds


async def test_busy(tmp_path, tiny_model):
    runtime = make_runtime(tmp_path, tiny_model)
    async with Callee("uas_busy.xml", tmp_path) as callee:
        placed = placed_call(runtime, await place_call(runtime, callee.uri))
        assert await placed.wait(20) == "busy"
        code, output = await callee.result()
    assert code == 0, output  # it got the ACK for its 486
    assert "486" in placed.detail
    assert placed.call is None and runtime.sessions == 0


async def test_no_answer_is_cancelled_at_the_ring_timeout(tmp_path, tiny_model):
    runtime = make_runtime(tmp_path, tiny_model, outbound="{ring_timeout: 2}")
    async with Callee("uas_no_answer.xml", tmp_path) as callee:
        started = time.monotonic()
        placed = placed_call(runtime, await place_call(runtime, callee.uri))
        assert await placed.wait(20) == "no-answer"
        took = time.monotonic() - started
        code, output = await callee.result()
    assert code == 0, output  # CANCEL came, and the ACK for the 487 after it
    assert "487" in placed.detail
    assert took >= 2.0  # rang for the whole ring timeout (no upper bound asserted: shared machine)
    assert runtime.sessions == 0


async def test_a_trunk_challenge_is_answered_with_the_digest(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("TEST_TRUNK_PASSWORD", "trunk-secret")
    callee_audio(tmp_path, "human_hello.wav")
    async with Callee("uas_auth_answer.xml", tmp_path, "-d", "4000", "-trace_logs") as callee:
        trunk = (
            f", trunk: {{address: '{HOST}:{callee.port}', username: agent, password_env: TEST_TRUNK_PASSWORD, "
            "caller_id: '+15550001111'}"
        )
        runtime = make_runtime(tmp_path, tiny_model, sip_extra=trunk)
        placed = placed_call(runtime, await place_call(runtime, "+1 (555) 123-0042"))
        assert placed.route == "trunk"
        assert await placed.wait(40) == "answered"
        code, output = await callee.result()
    assert code == 0, output
    uri = f"sip:+15551230042@{HOST}:{callee.port}"
    assert events(placed)["sip_invite"]["target"] == uri
    # The digest, checked here by RFC 2617's arithmetic (SIPp's own check reads only Authorization).
    logged = next(tmp_path.glob("*_logs.log")).read_text()
    fields = dict(re.findall(r'(\w+)="?([^",]+)"?', logged.split("credentials:", 1)[1].splitlines()[0]))
    assert fields["username"] == "agent" and fields["realm"] == "trunk.example" and fields["uri"] == uri
    assert fields["qop"] == "auth" and fields["nonce"] == "4f2a9c01d3e7"

    def md5(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    ha1, ha2 = md5("agent:trunk.example:trunk-secret"), md5(f"INVITE:{uri}")
    expected = md5(f"{ha1}:4f2a9c01d3e7:{fields['nc']}:{fields['cnonce']}:auth:{ha2}")
    assert fields["response"] == expected


async def test_a_challenge_without_credentials_fails(tmp_path, tiny_model):
    runtime = make_runtime(tmp_path, tiny_model)
    callee_audio(tmp_path, "human_hello.wav")  # SIPp reads the scenario's audio as it starts
    async with Callee("uas_auth_answer.xml", tmp_path, timeout=5) as callee:
        placed = placed_call(runtime, await place_call(runtime, callee.uri))
        assert await placed.wait(20) == "failed"
    assert "407" in placed.detail and "credentials" in placed.detail


async def test_a_machine_is_hung_up_on(tmp_path, tiny_model):
    runtime = make_runtime(tmp_path, tiny_model, outbound="{on_machine: hang_up}")
    callee_audio(tmp_path, "machine_beep.wav")
    async with Callee("uas_machine.xml", tmp_path) as callee:
        placed = placed_call(runtime, await place_call(runtime, callee.uri))
        assert await placed.wait(40) == "answered"
        code, output = await callee.result()
    assert code == 0, output  # our BYE came
    seen = events(placed)
    assert placed.answered_by == "machine", seen.get("answered_by")
    # Decided on 2.4 s of greeting (its speech starts 0.3 s in); 1 s of slack for RTP start-up.
    assert 2.4 <= seen["answered_by"]["after_secs"] <= 4.0
    assert "hanging_up_on_machine" in seen
    assert placed.call.stats.turns == 0  # the agent never answered the greeting
    assert placed.call.ended_by_agent


async def test_a_message_is_left_after_the_beep(tmp_path, tiny_model):
    message = "Hello, this is Riverside Dental confirming your appointment on Tuesday at ten."
    runtime = make_runtime(
        tmp_path, tiny_model, outbound=f"{{on_machine: leave_message, message: '{message}'}}"
    )
    callee_audio(tmp_path, "machine_beep.wav")
    async with Callee("uas_machine.xml", tmp_path) as callee:
        placed = placed_call(runtime, await place_call(runtime, callee.uri))
        assert await placed.wait(60) == "answered"
        code, output = await callee.result()
    assert code == 0, output
    order = [kind for _at, kind, _data in placed.events]
    assert order.index("answered_by") < order.index("beep") < order.index("leaving_message")
    seen = events(placed)
    assert placed.answered_by == "machine"
    # The fixture's beep: 1 kHz for 0.5 s, ending 9.2 s into the recording.
    assert seen["beep"]["hz"] == 1000 and 0.4 <= seen["beep"]["secs"] <= 0.6
    assert seen["leaving_message"]["text"] == message
    assert "agent_hung_up" in [kind for _at, kind, _data in placed.call.timeline]


def test_the_address_the_callee_reaches_us_at():
    from agent.lines.sip import _local_address
    from agent.outbound import OutboundError
    from agent.spec import SIPTransportSpec

    assert _local_address(SIPTransportSpec(host="0.0.0.0"), "127.0.0.1") == "127.0.0.1"  # the route's source
    assert _local_address(SIPTransportSpec(host="0.0.0.0", public_address="203.0.113.5"), "127.0.0.1") == "203.0.113.5"
    assert _local_address(SIPTransportSpec(host="127.0.0.1"), "127.0.0.1") == "127.0.0.1"
    with pytest.raises(OutboundError, match="transports.sip.host is 127.0.0.1: a call to 198.51.100.7 cannot leave"):
        _local_address(SIPTransportSpec(host="127.0.0.1"), "198.51.100.7")
