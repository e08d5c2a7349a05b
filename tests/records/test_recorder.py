"""Whole calls leave whole records: the real pipeline on the in-process line (tiny model, scripted
thinker, the flow's Python tools), then the record read back from the SQLite store the agent file
names, with its events, end reason and recording."""

import wave
from pathlib import Path

import numpy as np
import pytest

from agent.runtime import AgentRuntime
from agent.spec import load_agent
from agent.testing.inprocess import InProcessCall
from processors.chroma.scripted import Call, ScriptedReasoner
from records.recorder import CallRecords
from records.recording import drain_recordings
from records.store import open_store
from tests.flows.test_calls import ORDER_FLOW, write_agent
from tests.speech import requires_espeak, synthesize

RATE = 16000

SENSITIVE_FLOW = """
initial_node: menu
nodes:
  menu:
    respond_immediately: false
    task_messages: [{role: developer, content: Ask for the account.}]
    collect_dtmf: {max_digits: 2, terminator: "#", routes: {"12": pin}, default: pin}
  pin:
    respond_immediately: false
    task_messages: [{role: developer, content: Ask for the PIN.}]
    collect_dtmf: {max_digits: 6, terminator: "#", store_as: pin, default: done, sensitive: true}
  done:
    respond_immediately: false
    task_messages: [{role: developer, content: Thank them.}]
"""


def with_records(agent: Path, records: str) -> Path:
    agent.write_text(agent.read_text() + f"records: {records}\n")
    return agent


def runtime_with(agent: Path, tiny_model, turns) -> AgentRuntime:
    return AgentRuntime(load_agent(agent), model=tiny_model, reasoner=lambda: ScriptedReasoner(tiny_model.tokenizer, turns))


async def record_of(runtime: AgentRuntime, record_id: str):
    await runtime.close()  # the writer writes what is queued, then stops
    store = open_store(runtime.records.config.database)
    try:
        found = store.get_call(record_id)
    finally:
        store.close()
    assert found is not None, f"no record {record_id}"
    return found


def kinds(events) -> list[str]:
    return [e.kind for e in events]


@requires_espeak
async def test_a_call_with_a_tool_leaves_its_turns_replies_nodes_and_tool_call_in_order(tmp_path, tiny_model):
    agent = with_records(write_agent(tmp_path, ORDER_FLOW), "{recordings: recordings}")
    runtime = runtime_with(agent, tiny_model, [["Ok. ", Call("lookup_order", {"order_id": "A17"}), "Yes."]])
    async with InProcessCall(runtime) as line:
        line.call.identify({"test": "one"}, caller="+15550001111", callee="agent")
        await line.say(synthesize("Where is my order A17?", RATE))
        assert await line.quiet(settle=1.5)
        call = line.call
    info, events = await record_of(runtime, call.record_id)

    assert (tmp_path / "calls.db").exists()  # the default database, beside the agent file
    assert info.transport == "inprocess" and info.agent == "flow test agent" and info.voice == "demo"
    assert info.caller == "+15550001111" and info.transport_ids["test"] == "one"
    assert info.started_at <= info.answered_at <= info.ended_at
    assert info.end_reason == "caller_hung_up"
    assert [e.seq for e in events] == list(range(len(events)))
    assert all(a.at <= b.at for a, b in zip(events, events[1:], strict=False))
    k = kinds(events)
    assert k[0] == "node" and events[0].data["name"] == "start"
    # the caller spoke, then the agent answered with a tool call, then the tool's result moved the flow
    assert k.index("caller_turn_started") < k.index("caller_turn_ended") < k.index("reply_started")
    ended = events[k.index("caller_turn_ended")]
    assert 1.0 < ended.data["audio_seconds"] < 5.0  # "Where is my order A17?" plus the end-of-turn wait
    tool = next(e for e in events if e.kind == "tool_call")
    result = next(e for e in events if e.kind == "tool_result")
    assert tool.data["name"] == "lookup_order" and tool.data["arguments"] == {"order_id": "A17"}
    assert result.data["id"] == tool.data["id"] and result.data["result"] == {"status": "shipped", "eta": "Friday"}
    assert result.data["error"] is None and 0 <= result.data["seconds"] < 2
    assert [e.data["name"] for e in events if e.kind == "node"] == ["start", "shipped"]
    replies = [e.data for e in events if e.kind == "agent_reply"]
    assert [r["text"] for r in replies[:2]] == ["Ok. ", "Yes."]
    assert all(r["heard_text"] == r["text"] and not r["interrupted"] for r in replies)
    assert all(r["frames"] > 0 for r in replies)
    first_audio = [e.data for e in events if e.kind == "first_audio"]
    assert first_audio and all(0 < f["seconds"] < 5 for f in first_audio)

    # the recording: stereo, the caller on the left, the agent on the right
    drain_recordings()
    with wave.open(info.recording) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, RATE)
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, 2)
    duration = info.ended_at - info.answered_at
    assert -1.0 < len(pcm) / RATE - duration < 0.3  # from the caller's first audio to the hang-up
    assert np.abs(pcm[:, 0]).max() > 1000 and np.abs(pcm[:, 1]).max() > 1000


@requires_espeak
async def test_keys_in_a_sensitive_node_are_starred_and_the_caller_is_muted_there(tmp_path, tiny_model):
    agent = with_records(write_agent(tmp_path, SENSITIVE_FLOW), "{recordings: recordings}")
    runtime = runtime_with(agent, tiny_model, [["Ok."]])
    async with InProcessCall(runtime) as line:
        await line.press("12")
        await line._until(lambda: line.call.flow.nodes[-1:] == ["pin"], 5)
        muted_from = line.now
        await line.say(synthesize("My pin is one two three four.", RATE))  # spoken in the sensitive node
        await line.press("9876#")
        await line._until(lambda: line.call.flow.nodes[-1:] == ["done"], 5)
        muted_to = line.now
        await line.say(synthesize("Thank you.", RATE))
        await line.quiet(settle=1.0)
        call = line.call
    info, events = await record_of(runtime, call.record_id)
    keys = [(e.data["key"], e.data["redacted"]) for e in events if e.kind == "keypad"]
    assert keys == [("1", False), ("2", False), *[("*", True)] * 5]
    assert "9876" not in str([e.data for e in events])
    assert [(e.data["name"], e.data["sensitive"]) for e in events if e.kind == "node"] == [
        ("menu", False), ("pin", True), ("done", False),
    ]  # fmt: skip
    drain_recordings()
    with wave.open(info.recording) as w:
        caller = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, 2)[:, 0]
    # the recording starts with the call, within a frame or two of the line's clock: 0.3 s margins
    inside = caller[round((muted_from + 0.3) * RATE) : round((muted_to - 0.3) * RATE)]
    after = caller[round((muted_to + 0.3) * RATE) :]
    assert inside.size and np.abs(inside).max() == 0  # the PIN spoken in the node is not in the file
    assert np.abs(after).max() > 1000  # the caller is heard again once the node is left


END_CALL_FLOW = """
initial_node: start
nodes:
  start:
    respond_immediately: false
    task_messages: [{role: developer, content: Help.}]
    functions:
      - {name: finished, transition_only: true, description: The caller is done., transition_to: bye}
  bye:
    task_messages: [{role: developer, content: Say goodbye.}]
    post_actions: [{type: end_call}]
"""

TRANSFER_FLOW = """
initial_node: start
nodes:
  start:
    respond_immediately: false
    task_messages: [{role: developer, content: Help.}]
    functions:
      - {name: human, transition_only: true, description: The caller wants a person., transition_to: transfer}
  transfer:
    respond_immediately: false
    task_messages: [{role: developer, content: Transfer.}]
    pre_actions: [{type: say, text: Connecting.}]
    post_actions: [{type: transfer_call, to: "+15551234567"}]
"""


@requires_espeak
@pytest.mark.parametrize(
    "flow, turns, ending, detail",
    [
        (END_CALL_FLOW, [[Call("finished", {}), "Bye."]], "agent_ended", None),
        (TRANSFER_FLOW, [[Call("human", {})]], "transferred", "+15551234567"),
    ],
    ids=["agent_ended", "transferred"],
)
async def test_the_record_says_how_the_call_ended(tmp_path, tiny_model, flow, turns, ending, detail):
    runtime = runtime_with(write_agent(tmp_path, flow, max_seconds=3), tiny_model, turns)
    async with InProcessCall(runtime) as line:
        await line.say(synthesize("That is all, thanks.", RATE))
        assert await line._until(lambda: line.ended, 20)
        call = line.call
    info, events = await record_of(runtime, call.record_id)
    assert (info.end_reason, info.end_detail) == (ending, detail)
    if ending == "transferred":
        assert ("transferred", {"to": detail}) in [(e.kind, e.data) for e in events]
    assert "agent_hung_up" in kinds(events)


async def test_a_busy_refusal_is_a_record_that_ends_busy(tmp_path, tiny_model):
    agent = tmp_path / "agent.yaml"
    agent.write_text(
        f"name: busy agent\nmodel: tiny\nvoice: {Path(__file__).resolve().parents[2] / 'examples/voices/demo'}\n"
        "max_sessions: 1\n"
    )
    runtime = AgentRuntime(load_agent(agent), model=tiny_model)
    await runtime.prepare()
    runtime.record_refusal("sip", "at capacity: 1 of max_sessions 1", transport_ids={"sip_call_id": "abc@h"}, caller="alice")
    await runtime.close()
    store = open_store(str(tmp_path / "calls.db"))
    try:
        (info,) = store.list_calls()
    finally:
        store.close()
    assert (info.end_reason, info.end_detail, info.caller) == ("busy", "at capacity: 1 of max_sessions 1", "alice")
    assert info.transport_ids == {"sip_call_id": "abc@h"} and info.ended_at == info.started_at


def test_records_off_means_no_recorder_and_no_database(tmp_path, tiny_model):
    agent = with_records(write_agent(tmp_path, ORDER_FLOW), "{enabled: false}")
    assert CallRecords.from_spec(load_agent(agent)) is None


def test_the_environment_url_overrides_the_agent_files_database(tmp_path, monkeypatch):
    agent = with_records(write_agent(tmp_path, ORDER_FLOW), "{database: records/x.db, recordings: rec}")
    spec = load_agent(agent)
    assert spec.records.database_url(tmp_path) == str(tmp_path / "records/x.db")
    assert spec.records.recordings_folder(tmp_path) == tmp_path / "rec"
    monkeypatch.setenv("CHROMA_AGENTS_DATABASE_URL", "postgresql://u:p@127.0.0.1/db")
    assert spec.records.database_url(tmp_path) == "postgresql://u:p@127.0.0.1/db"


def test_a_bad_records_section_names_the_field_and_what_was_expected(tmp_path):
    from agent.spec import AgentFileError

    agent = with_records(write_agent(tmp_path, ORDER_FLOW), "{retention_days: 0, recording: x}")
    with pytest.raises(AgentFileError) as failed:
        load_agent(agent)
    message = str(failed.value)
    assert "records.retention_days: 0" in message and "records.recording: unknown key" in message


async def test_a_call_ended_by_a_failing_task_records_error_and_its_message(tmp_path, tiny_model):
    runtime = runtime_with(write_agent(tmp_path, ORDER_FLOW), tiny_model, [["Ok."]])
    async with InProcessCall(runtime) as line:
        await line.wait(0.3)
        # what CallTasks does when one of the call's tasks raises
        line.call._task_failed("feed-caller-audio", RuntimeError("socket buffer gone"))
        assert await line._until(lambda: line.ended, 10)
        call = line.call
    info, _events = await record_of(runtime, call.record_id)
    assert info.end_reason == "error" and info.end_detail == "feed-caller-audio: RuntimeError: socket buffer gone"


async def test_a_restarted_server_ends_only_the_calls_it_left_open(tmp_path):
    """Several servers share one database: a server that starts marks its own unfinished calls as
    crashed, never the live calls of another server."""
    from records.model import CallInfo
    from records.recorder import RecordsConfig

    db = str(tmp_path / "calls.db")
    store = open_store(db)
    store.start_call(CallInfo(call_id="mine", agent="a", transport="sip", started_at=1.0, server="host:8080"))
    store.start_call(CallInfo(call_id="theirs", agent="a", transport="sip", started_at=1.0, server="host:8081"))
    store.close()
    records = CallRecords(RecordsConfig(database=db, recordings=None, retention_days=None, agent="a"))
    records.server = "host:8080"
    await records.start()
    await records.close()
    store = open_store(db)
    try:
        assert store.get_call("mine")[0].end_reason == "crash"
        assert store.get_call("theirs")[0].end_reason is None
    finally:
        store.close()
