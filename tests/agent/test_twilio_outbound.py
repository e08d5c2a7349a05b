"""Calls the agent places over Twilio, end to end: the agent's server on 127.0.0.1 (uvicorn), the tiny
model, and stand-ins for what cannot run here: Twilio's REST API and the phones it calls
(agent/testing/twilio_rest.py), which open the call's Media Stream with the Twilio stream stand-in
(agent/testing/twilio_caller.py) and post signed status and answering-machine callbacks."""

import asyncio
import contextlib
import xml.etree.ElementTree as ET

import httpx
import numpy as np
import pytest
from pipecat.frames.frames import InputAudioRawFrame
from pipecat.processors.frame_processor import FrameDirection
from twilio.request_validator import RequestValidator

from agent import twilio_outbound
from agent.outbound import OutboundError, PlacedCall, place_call, placed_call
from agent.runtime import AgentRuntime
from agent.server import create_app
from agent.spec import load_agent
from agent.testing.lines import serving
from agent.testing.twilio_rest import Callee, TwilioRest
from agent.twilio_outbound import VerdictGate, check_twilio_call
from tests.agent.test_call import agent_file as call_agent_file
from tests.speech import requires_espeak, synthesize

TOKEN = "f" * 32
ACCOUNT = "AC" + "a" * 32
PUBLIC = "https://agent.example.com"
CALLER_ID = "+15557654321"
CALLEE = "+15551230000"
TICK = 0.02

FLOW = """\
initial_node: start
state:
  appointment: "(none given)"
nodes:
  start:
    respond_immediately: false
    task_messages:
      - {role: developer, content: "Confirm the appointment on {{ appointment }}."}
"""


def agent_file(tmp_path, api_url: str, *, outbound: str = "{}", twilio: str = "", flow: bool = True):
    path = call_agent_file(tmp_path, max_seconds=1)
    twilio = twilio or (
        f"{{enabled: true, auth_token: {TOKEN}, account_sid: {ACCOUNT}, from_number: '{CALLER_ID}', "
        f"api_url: '{api_url}'}}"
    )
    text = path.read_text() + f"\ntransports:\n  twilio: {twilio}\noutbound: {outbound}\n"
    if flow:
        (tmp_path / "flow.yaml").write_text(FLOW)
        text += "flow: flow.yaml\n"
    path.write_text(text)
    return path


def runtime_for(tmp_path, tiny_model, api_url: str, **kw) -> AgentRuntime:
    runtime = AgentRuntime(load_agent(agent_file(tmp_path, api_url, **kw)), model=tiny_model)
    # These tests are about Twilio's side of a call. On a shared, loaded CPU the engine's own verdict
    # (behind real time: refuse new calls) would refuse them at random; capacity has its own tests.
    runtime.engine_status = None
    return runtime


@contextlib.asynccontextmanager
async def twilio_line(tmp_path, tiny_model, **kw):
    """The agent's server and Twilio's stand-in, each pointing at the other."""
    async with TwilioRest.running(ACCOUNT, TOKEN) as cloud:
        runtime = runtime_for(tmp_path, tiny_model, cloud.url, **kw)
        async with serving(create_app(runtime, public_url=PUBLIC)) as host:
            cloud.server = host
            yield runtime, cloud, host


async def place(runtime, to=CALLEE, **kw):
    placed = placed_call(runtime, await place_call(runtime, to, **kw))
    assert placed is not None
    return placed


def kinds(placed) -> list[str]:
    return [kind for _at, kind, _data in placed.events]


def event(placed, kind: str) -> dict:
    return next(data for _at, k, data in placed.events if k == kind)


# --- the create request ------------------------------------------------------------------------------


async def test_create_request_carries_the_signed_stream_callbacks_and_machine_detection(tmp_path, tiny_model):
    async with twilio_line(tmp_path, tiny_model) as (runtime, cloud, _host):
        cloud.callee(CALLEE, Callee(pickup="busy"))
        placed = await place(runtime)
        await placed.wait(timeout=10)
    [request] = [r for r in cloud.requests if r["path"].endswith("/Calls.json")]
    assert request["path"] == f"/2010-04-01/Accounts/{ACCOUNT}/Calls.json"
    form = {k: v if k == "StatusCallbackEvent" else v[0] for k, v in request["form"].items()}
    assert form["To"] == CALLEE and form["From"] == CALLER_ID
    stream = ET.fromstring(form["Twiml"]).find("Connect/Stream")
    assert stream.get("url") == "wss://agent.example.com/twilio/media"
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params["agent"] == runtime.spec.name and params["token"]
    assert form["StatusCallback"] == f"{PUBLIC}/twilio/outbound/status?placed={placed.id}"
    assert form["StatusCallbackEvent"] == ["initiated", "ringing", "answered", "completed"]
    assert form["MachineDetection"] == "Enable"  # outbound.on_machine: hang_up (the default)
    assert form["AsyncAmd"] == "true" and form["MachineDetectionTimeout"] == "30"
    assert form["AsyncAmdStatusCallback"] == f"{PUBLIC}/twilio/outbound/amd?placed={placed.id}"
    assert form["Timeout"] == "30"  # outbound.ring_timeout's default


# --- who answers, and how it ends ------------------------------------------------------------------------


@requires_espeak
async def test_a_person_answers_the_agent_waits_for_their_hello_then_talks_with_the_flow_state(
    tmp_path, tiny_model
):
    hello = synthesize("Hello?", 8000)
    hello_end = 0.5 + len(hello) / 8000
    async with twilio_line(tmp_path, tiny_model) as (runtime, cloud, _host):
        cloud.callee(CALLEE, Callee(audio=hello, audio_at=0.5, seconds=hello_end + 4.5, amd_secs=hello_end + 1.2))
        placed = await place(runtime, state={"appointment": "Tuesday at ten"})
        outcome = await placed.wait(timeout=30)
    twilio_call = cloud.calls[0]
    timeline = twilio_call.timeline
    assert outcome == "answered" and placed.answered_by == "human"
    # Nothing from the agent before the callee spoke; then an audible reply.
    replies = timeline.replies()
    assert replies and replies[0][0] > hello_end
    assert not any(timeline.playing[: round(hello_end / TICK)])
    heard = timeline.heard[round(replies[0][0] * 8000) : round((replies[0][1] + TICK) * 8000)].astype(np.float64)
    assert np.sqrt(np.mean(heard**2)) > 100
    # The flow started with the state the call was placed with.
    call = placed.call
    assert call.stats.call_id == twilio_call.sid and call.flow_state["appointment"] == "Tuesday at ten"
    assert any("Confirm the appointment on Tuesday at ten." in str(m.get("content")) for m in call.context.get_messages())
    assert twilio_call.statuses == ["initiated", "ringing", "in-progress", "completed"]
    assert kinds(placed)[:4] == ["dialling", "created", "twilio_status", "ringing"]
    amd_ms = round((hello_end + 1.2) * 1000)
    assert event(placed, "answered_by") == {"answered_by": "human", "twilio_answered_by": "human", "seconds": amd_ms / 1000}
    assert kinds(placed)[-1] == "ended" and runtime.sessions == 0


@pytest.mark.parametrize(("pickup", "outcome"), [("busy", "busy"), ("no-answer", "no-answer"), ("failed", "failed")])
async def test_a_call_nobody_answers_ends_with_twilios_status_and_frees_its_session(
    tmp_path, tiny_model, pickup, outcome
):
    async with twilio_line(tmp_path, tiny_model) as (runtime, cloud, _host):
        cloud.callee(CALLEE, Callee(pickup=pickup))
        placed = await place(runtime)
        assert runtime.sessions == 1  # held while it rings
        assert await placed.wait(timeout=10) == outcome
    assert placed.call is None and runtime.metrics.calls["twilio"] == 0
    assert runtime.sessions == 0
    assert placed.detail.startswith(f"Twilio: {pickup}")
    assert "ringing" in kinds(placed) and event(placed, "ended")["outcome"] == outcome


def greeting(*parts) -> np.ndarray:
    """A machine's greeting: espeak-ng sentences (8 kHz) with the given pauses (seconds) between them."""
    return np.concatenate(
        [synthesize(p, 8000) if isinstance(p, str) else np.zeros(round(p * 8000), np.int16) for p in parts]
    )


@requires_espeak
async def test_a_machine_is_never_answered_and_is_hung_up_on(tmp_path, tiny_model):
    # A greeting short enough that the agent, hearing it, would have answered before Twilio's verdict.
    recorded = greeting("Hi, this is Sam.")
    verdict_at = 0.2 + len(recorded) / 8000 + 2.0
    async with twilio_line(tmp_path, tiny_model) as (runtime, cloud, _host):
        cloud.callee(
            CALLEE,
            Callee(audio=recorded, audio_at=0.2, seconds=verdict_at + 5, answered_by="machine_start", amd_secs=verdict_at),
        )
        placed = await place(runtime)
        outcome = await placed.wait(timeout=30)
    twilio_call = cloud.calls[0]
    timeline = twilio_call.timeline
    assert outcome == "answered" and placed.answered_by == "machine"
    assert "hanging_up_on_machine" in kinds(placed) and placed.call.ended_by_agent
    assert not any(timeline.playing)  # the agent never answered the greeting
    assert timeline.closed_by_server_at is not None and timeline.closed_by_server_at < verdict_at + 3
    assert any("<Hangup" in u.get("Twiml", [""])[0] for u in twilio_call.updates)  # hung up over REST


@requires_espeak
async def test_a_machine_gets_the_message_after_the_beep_when_the_agent_leaves_one(tmp_path, tiny_model):
    outbound = "{on_machine: leave_message, message: 'Your appointment is on Tuesday at ten.'}"
    # A pause mid-greeting: long enough for the agent to take a turn, were it listening.
    recorded = greeting("Hi, this is Sam.", 1.5, "Please leave a message.")
    beep_end = 0.2 + len(recorded) / 8000 + 0.5
    async with twilio_line(tmp_path, tiny_model, outbound=outbound) as (runtime, cloud, _host):
        cloud.callee(
            CALLEE,
            Callee(audio=recorded, audio_at=0.2, seconds=beep_end + 8, answered_by="machine_end_beep", amd_secs=beep_end),
        )
        placed = await place(runtime)
        outcome = await placed.wait(timeout=40)
    twilio_call = cloud.calls[0]
    timeline = twilio_call.timeline
    assert twilio_call.one("MachineDetection") == "DetectMessageEnd"
    assert outcome == "answered" and placed.answered_by == "machine"
    assert event(placed, "answered_by")["twilio_answered_by"] == "machine_end_beep"
    assert event(placed, "leaving_message")["text"] == "Your appointment is on Tuesday at ten."
    replies = timeline.replies()
    assert replies and replies[0][0] >= beep_end  # spoken after the beep, never over the greeting
    assert timeline.closed_by_server_at is not None  # and then the agent hung up


async def test_a_fax_is_hung_up_on_even_when_the_agent_leaves_messages(tmp_path, tiny_model):
    outbound = "{on_machine: leave_message, message: 'Your appointment is on Tuesday at ten.'}"
    async with twilio_line(tmp_path, tiny_model, outbound=outbound) as (runtime, cloud, _host):
        cloud.callee(CALLEE, Callee(seconds=10, answered_by="fax", amd_secs=1.0))
        placed = await place(runtime)
        assert await placed.wait(timeout=20) == "answered"
    assert placed.answered_by == "machine" and event(placed, "answered_by")["twilio_answered_by"] == "fax"
    assert "hanging_up_on_fax" in kinds(placed) and "leaving_message" not in kinds(placed)
    assert not any(cloud.calls[0].timeline.playing) and cloud.calls[0].timeline.closed_by_server_at < 5


# --- callbacks -----------------------------------------------------------------------------------------


async def post_signed(host: str, path: str, form: dict, auth_token: str = TOKEN) -> httpx.Response:
    signature = RequestValidator(auth_token).compute_signature(PUBLIC + path, form)
    async with httpx.AsyncClient() as client:
        return await client.post(f"http://{host}{path}", data=form, headers={"X-Twilio-Signature": signature})


async def test_callbacks_without_twilios_signature_are_refused_and_change_nothing(tmp_path, tiny_model):
    async with twilio_line(tmp_path, tiny_model) as (runtime, cloud, host):
        cloud.callee(CALLEE, Callee(pickup="no-answer", ring_secs=2.0))
        placed = await place(runtime)
        while not cloud.calls or "created" not in kinds(placed):
            await asyncio.sleep(0.02)
        sid = cloud.calls[0].sid
        status = f"/twilio/outbound/status?placed={placed.id}"
        amd = f"/twilio/outbound/amd?placed={placed.id}"
        forged = [
            await post_signed(host, status, {"CallSid": sid, "CallStatus": "busy"}, auth_token="0" * 32),
            await post_signed(host, amd, {"CallSid": sid, "AnsweredBy": "machine_start"}, auth_token="0" * 32),
        ]
        async with httpx.AsyncClient() as client:  # no signature at all
            forged.append(await client.post(f"http://{host}{status}", data={"CallSid": sid, "CallStatus": "busy"}))
        # Signed, but for another placed call: the signature covers the query, so it fails too.
        signature = RequestValidator(TOKEN).compute_signature(f"{PUBLIC}/twilio/outbound/status?placed=other", {})
        async with httpx.AsyncClient() as client:
            forged.append(
                await client.post(
                    f"http://{host}{status}",
                    data={"CallSid": sid, "CallStatus": "busy"},
                    headers={"X-Twilio-Signature": signature},
                )
            )
        assert [r.status_code for r in forged] == [403, 403, 403, 403]
        assert not placed.done and placed.answered_by is None
        assert await placed.wait(timeout=10) == "no-answer"  # what Twilio itself said
    assert runtime.metrics.dropped_input["twilio_bad_signature"] == 4


async def test_a_signed_callback_for_another_call_sid_is_ignored(tmp_path, tiny_model):
    async with twilio_line(tmp_path, tiny_model) as (runtime, cloud, host):
        cloud.callee(CALLEE, Callee(pickup="busy", ring_secs=1.0))
        placed = await place(runtime)
        while "created" not in kinds(placed):
            await asyncio.sleep(0.02)
        r = await post_signed(
            host, f"/twilio/outbound/status?placed={placed.id}", {"CallSid": "CA" + "0" * 32, "CallStatus": "failed"}
        )
        assert r.status_code == 204 and not placed.done
        assert await placed.wait(timeout=10) == "busy"


# --- errors ----------------------------------------------------------------------------------------------


async def test_twilio_refusing_the_call_is_a_clear_error_naming_the_field(tmp_path, tiny_model):
    async with twilio_line(tmp_path, tiny_model) as (runtime, cloud, _host):
        cloud.callee("+15005550001", Callee(pickup="invalid"))
        placed = await place(runtime, to="+15005550001")
        assert await placed.wait(timeout=10) == "failed"
    assert "error 21211" in placed.detail and "[field To: sent '+15005550001']" in placed.detail
    assert "is not a valid phone number" in placed.detail and runtime.sessions == 0


async def test_wrong_credentials_say_which_settings_to_check(tmp_path, tiny_model):
    async with TwilioRest.running(ACCOUNT, "e" * 32) as cloud:  # Twilio knows another auth token
        runtime = runtime_for(tmp_path, tiny_model, cloud.url)
        async with serving(create_app(runtime, public_url=PUBLIC)) as host:
            cloud.server = host
            placed = await place(runtime)
            assert await placed.wait(timeout=10) == "failed"
    assert "HTTP 401, error 20003" in placed.detail and "transports.twilio.account_sid and auth_token" in placed.detail


async def test_an_unreachable_api_is_a_clear_error(tmp_path, tiny_model):
    runtime = runtime_for(tmp_path, tiny_model, "http://127.0.0.1:9")
    create_app(runtime, public_url=PUBLIC)  # sets up the Twilio routes
    placed = await place(runtime)
    assert await placed.wait(timeout=15) == "failed"
    assert "could not reach Twilio's REST API at http://127.0.0.1:9/2010-04-01/" in placed.detail


def test_without_a_caller_id_or_account_the_call_is_refused_before_dialling(tmp_path, tiny_model):
    twilio = f"{{enabled: true, auth_token: {TOKEN}, account_sid: {ACCOUNT}}}"
    runtime = AgentRuntime(load_agent(agent_file(tmp_path, "", twilio=twilio)), model=tiny_model)
    create_app(runtime, public_url=PUBLIC)
    with pytest.raises(OutboundError, match=r"caller ID: set transports\.twilio\.from_number"):
        check_twilio_call(runtime, None)
    check_twilio_call(runtime, CALLER_ID)  # a from number given with the call will do
    off = AgentRuntime(load_agent(agent_file(tmp_path, "", twilio="{enabled: false}")), model=tiny_model)
    with pytest.raises(OutboundError, match=r"transports\.twilio\.enabled: true"):
        check_twilio_call(off, CALLER_ID)
    no_server = AgentRuntime(load_agent(agent_file(tmp_path, "", twilio=twilio)), model=tiny_model)
    with pytest.raises(OutboundError, match=r"the agent's server.*chroma-agent serve, then POST /api/calls"):
        check_twilio_call(no_server, CALLER_ID)  # e.g. `dial` without a server for Twilio to stream to


async def test_a_call_twilio_never_reports_on_is_cancelled_and_failed(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(twilio_outbound, "REPORT_GRACE_SECS", 0.5)
    async with twilio_line(tmp_path, tiny_model, outbound="{ring_timeout: 5}") as (runtime, cloud, _host):
        cloud.callee(CALLEE, Callee(ring_secs=30))
        cloud.server = None  # Twilio's callbacks reach nobody
        placed = await place(runtime)
        assert await placed.wait(timeout=15) == "failed"
    assert placed.detail == "Twilio reported nothing within 6 s" and runtime.sessions == 0
    assert cloud.calls[0].updates == [{"Status": ["canceled"]}]  # and Twilio was told to stop ringing


async def test_an_answered_call_whose_stream_never_opens_is_hung_up_and_failed(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(twilio_outbound, "STREAM_WAIT_SECS", 1.0)
    async with twilio_line(tmp_path, tiny_model) as (runtime, cloud, _host):
        cloud.callee(CALLEE, Callee(connects=False, seconds=20))
        placed = await place(runtime)
        assert await placed.wait(timeout=15) == "failed"
    assert placed.detail == "answered, but Twilio opened no media stream within 1 s"
    assert cloud.calls[0].updates == [{"Status": ["completed"]}] and runtime.sessions == 0


async def test_twilios_first_callback_may_overtake_its_answer_to_the_create_request(tmp_path, tiny_model):
    runtime = runtime_for(tmp_path, tiny_model, "http://127.0.0.1:9")
    create_app(runtime, public_url=PUBLIC)
    dial_out = runtime.twilio_dial_out
    placed = PlacedCall("out-test", CALLEE, "twilio")
    leg = dial_out.open(placed)
    sid = "CA" + "1" * 32
    assert dial_out.status(placed.id, {"CallSid": sid, "CallStatus": "initiated"})  # before create() returned
    assert leg.call_sid == sid and dial_out.leg_for_stream(sid) is leg
    assert not dial_out.status(placed.id, {"CallSid": "CA" + "2" * 32, "CallStatus": "busy"})  # another call's
    assert dial_out.amd(placed.id, {"CallSid": sid, "AnsweredBy": "unknown"})
    assert placed.answered_by == "unknown" and not leg.final.is_set()
    assert dial_out.status(placed.id, {"CallSid": sid, "CallStatus": "no-answer"}) and leg.final.is_set()
    assert dial_out.status(placed.id, {"CallSid": sid, "CallStatus": "ringing"}) and leg.status == "no-answer"


# --- a conversation test on the outbound Twilio line -------------------------------------------------

SCRIPT = """
turns = [["Hello, this is the clinic calling about your appointment."], ["Great, see you then."]]
"""

# Time to first audio counts from the end of the callee's words: Twilio's verdict (1.2 s of silence
# after them), the end of turn (0.4 s) and the reply; room for a shared 2-core machine.
SCENARIO = """
agent: agent.yaml
scenarios:
  - name: appointment reminder over Twilio
    script: script.py:turns
    turns:
      - user: "Hello?"
        expect:
          - {event: bot_started_speaking, within_ms: 4500}
      - user: "Yes, Tuesday works for me."
        pause_ms: 500
        expect:
          - {event: bot_started_speaking, within_ms: 3000}
"""


@requires_espeak
def test_an_outbound_scenario_runs_over_twilio_like_an_inbound_one(tmp_path):
    from agent.testing.pipecat_evals import load_scenarios
    from agent.testing.runner import ScenarioRunner

    (tmp_path / "script.py").write_text(SCRIPT)
    path = call_agent_file(tmp_path, max_seconds=2)
    path.write_text(path.read_text().replace("silence_secs: 0.5", "silence_secs: 0.4"))
    (tmp_path / "reminder.yaml").write_text(SCENARIO)
    file = load_scenarios(tmp_path / "reminder.yaml")
    result = asyncio.run(ScenarioRunner().run(file, file.scenarios[0], "twilio-outbound", 1))
    assert result.error is None, result.error
    assert len(result.checks) >= 2 and [c.name for c in result.checks if not c.passed] == []
    kinds = [e.kind for e in result.events]
    assert kinds.count("caller_speech_start") == 2 and "agent_audio_start" in kinds


# --- the gate between the callee and the agent -----------------------------------------------------------


def gate_collecting(hold_secs: float) -> tuple[VerdictGate, list]:
    gate, passed = VerdictGate(hold_secs=hold_secs), []

    async def push(frame, direction=FrameDirection.DOWNSTREAM):
        passed.append(frame)

    gate.push_frame = push
    return gate, passed


def audio(n: int) -> list[InputAudioRawFrame]:
    """n frames of 20 ms at 8 kHz, each marked by its first byte."""
    return [InputAudioRawFrame(audio=bytes([i]) * 320, sample_rate=8000, num_channels=1) for i in range(n)]


async def test_the_gate_holds_the_callees_audio_until_a_person_is_decided_then_passes_all_in_order():
    gate, passed = gate_collecting(hold_secs=5.0)
    frames = audio(6)
    for frame in frames[:4]:
        await gate.process_frame(frame, FrameDirection.DOWNSTREAM)
    assert passed == []
    gate.decide("human")
    for frame in frames[4:]:
        await gate.process_frame(frame, FrameDirection.DOWNSTREAM)
    assert passed == frames


async def test_the_gate_never_passes_a_machines_audio_and_gives_up_holding_without_a_verdict():
    machine, machine_passed = gate_collecting(hold_secs=0.1)
    machine.decide("machine")
    for frame in audio(20):
        await machine.process_frame(frame, FrameDirection.DOWNSTREAM)
    assert machine_passed == []
    silent, silent_passed = gate_collecting(hold_secs=0.1)  # no verdict ever: heard after 0.1 s held
    frames = audio(8)
    for frame in frames:
        await silent.process_frame(frame, FrameDirection.DOWNSTREAM)
    assert silent_passed == frames
