"""Whole flows through whole calls: the real pipeline (VAD, end of turn, the engine service on the tiny
model, pipecat's FlowManager, the flow's Python tools) on the in-process transport, in real time.

The thinker's choice of words is scripted (`ScriptedReasoner`): with random tiny weights that is the
only way to get a deterministic conversation. Everything after the choice runs for real: the tool-call
filter parses the scripted call out of the token stream, pipecat runs the function, FlowManager moves
between nodes, and the backbone, decoder and codec speak.
"""

import json
import textwrap
from pathlib import Path

import pytest

from agent.runtime import AgentRuntime
from agent.spec import AgentFileError, load_agent
from agent.testing.inprocess import InProcessCall
from processors.chroma.scripted import Call, ScriptedReasoner
from processors.chroma.tools import CALL_OPEN
from tests.speech import requires_espeak, synthesize

ROOT = Path(__file__).resolve().parents[2]
RATE = 16000

TOOLS = '''
import asyncio, json
from pathlib import Path

LOG = Path(__file__).with_name("calls.jsonl")


def _log(name, **args):
    with LOG.open("a") as f:
        f.write(json.dumps({"name": name, "args": args}) + "\\n")


def lookup_order(order_id):
    _log("lookup_order", order_id=order_id)
    return {"status": "shipped" if order_id == "A17" else "lost", "eta": "Friday"}


async def slow_lookup(order_id):
    _log("slow_lookup", order_id=order_id)
    await asyncio.sleep(float(Path(__file__).with_name("delay").read_text()))
    return {"status": "shipped"}
'''

SLOW_TOOL = """
  slow_lookup:
    description: Look up an order, slowly.
    parameters:
      type: object
      properties: {order_id: {type: string}}
      required: [order_id]
    python: call_tools:slow_lookup
    timeout_secs: %(timeout)s
    filler: %(filler)s
    filler_after_secs: 0.3
    fallback: Sorry.
"""


def write_agent(tmp_path: Path, flow: str, *, max_seconds: float = 1.0, delay: float = 0.0) -> Path:
    (tmp_path / "call_tools.py").write_text(TOOLS)
    (tmp_path / "delay").write_text(str(delay))
    (tmp_path / "flow.yaml").write_text(textwrap.dedent(flow))
    agent = tmp_path / "agent.yaml"
    agent.write_text(
        f"""
name: flow test agent
model: tiny
voice: {ROOT / "examples/voices/demo"}
system_prompt: You are a test agent.
flow: flow.yaml
turn:
  detector: silence
  silence_secs: 0.4
response:
  max_seconds: {max_seconds}
"""
    )
    return agent


def runtime_with(agent: Path, tiny_model, turns) -> tuple[AgentRuntime, list[ScriptedReasoner]]:
    reasoners: list[ScriptedReasoner] = []

    def reasoner():
        reasoners.append(ScriptedReasoner(tiny_model.tokenizer, turns))
        return reasoners[-1]

    return AgentRuntime(load_agent(agent), model=tiny_model, reasoner=reasoner), reasoners


def turn_texts(line: InProcessCall) -> list[str]:
    return list(line.call.stats.texts)


def tool_log(tmp_path: Path) -> list[dict]:
    log = tmp_path / "call_tools.py"
    path = log.with_name("calls.jsonl")
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


ORDER_FLOW = """
tools:
  lookup_order:
    description: Look up an order by its number.
    parameters:
      type: object
      properties: {order_id: {type: string}}
      required: [order_id]
    python: call_tools:lookup_order
    store_as: order
    timeout_secs: 2
    fallback: Sorry.
initial_node: start
nodes:
  start:
    respond_immediately: false
    task_messages:
      - {role: developer, content: Ask for the order number.}
    functions:
      - name: lookup_order
        transition_to:
          field: status
          cases: {shipped: shipped, lost: lost}
  shipped:
    task_messages:
      - {role: developer, content: "Say order {{ order.status }}, due {{ order.eta }}."}
  lost:
    task_messages:
      - {role: developer, content: Apologise.}
"""


@requires_espeak
async def test_a_tool_call_runs_unspoken_and_its_result_picks_the_next_node(tmp_path, tiny_model):
    agent = write_agent(tmp_path, ORDER_FLOW)
    runtime, reasoners = runtime_with(
        agent, tiny_model, [["Ok. ", Call("lookup_order", {"order_id": "A17"}), "Yes."]]
    )
    async with InProcessCall(runtime) as line:
        await line.say(synthesize("Where is my order A17?", RATE))
        assert await line.quiet(settle=1.5)
        call = line.call
        session = call.service.session
    assert call.tool_calls == [("lookup_order", {"order_id": "A17"})]
    assert tool_log(tmp_path) == [{"name": "lookup_order", "args": {"order_id": "A17"}}]
    assert call.flow.nodes == ["start", "shipped"]
    # what was spoken: the words before the call, then the answer after the result; never the call
    assert turn_texts(line)[:2] == ["Ok. ", "Yes."]
    assert not any(CALL_OPEN in t or "lookup_order" in t for t in turn_texts(line))
    # what the thinker read, in order: its call, the result, the next node's task (with the result filled in)
    history = session.tokenizer.decode(session.history_ids + session.pending_ids)
    call_at = history.index('{"name": "lookup_order", "arguments": {"order_id": "A17"}}')
    result_at = history.index('"status": "shipped"', call_at)
    task_at = history.index("Say order shipped, due Friday.", result_at)
    assert call_at < result_at < task_at
    assert reasoners[0].results == [{"status": "shipped", "eta": "Friday"}]


@requires_espeak
async def test_a_tool_past_its_timeout_speaks_the_filler_then_the_fallback_and_stays(tmp_path, tiny_model):
    flow = ORDER_FLOW.replace("tools:\n", "tools:\n" + SLOW_TOOL % {"timeout": 1, "filler": "Hm."}, 1)
    flow = flow.replace("- name: lookup_order\n        transition_to:", "- name: slow_lookup\n        transition_to:")
    agent = write_agent(tmp_path, flow, delay=3.0)
    runtime, reasoners = runtime_with(
        agent, tiny_model, [["Ok. ", Call("slow_lookup", {"order_id": "A17"}), "Never said."]]
    )
    async with InProcessCall(runtime) as line:
        said_at, _ = await line.say(synthesize("Where is my order?", RATE))
        # the tool runs 3 s against a 1 s limit: filler at 0.3 s, fallback at 1 s
        assert await line.quiet(settle=1.5, timeout=20)
        call = line.call
    assert call.tool_calls == [("slow_lookup", {"order_id": "A17"})]
    assert turn_texts(line) == ["Ok. ", "Hm.", "Sorry."]
    assert call.flow.nodes == ["start"]  # a failed tool moves nowhere
    assert reasoners[0].results and "timed out" in reasoners[0].results[0]["error"]


@requires_espeak
async def test_end_call_hangs_up_after_the_goodbye_is_spoken(tmp_path, tiny_model):
    flow = """
    initial_node: start
    nodes:
      start:
        respond_immediately: false
        task_messages: [{role: developer, content: Help.}]
        functions:
          - name: finished
            transition_only: true
            description: The caller is done.
            transition_to: bye
      bye:
        task_messages: [{role: developer, content: Say goodbye.}]
        post_actions:
          - type: end_call
    """
    runtime, _ = runtime_with(write_agent(tmp_path, flow), tiny_model, [[Call("finished", {}), "Bye."]])
    async with InProcessCall(runtime) as line:
        await line.say(synthesize("That is all, thanks.", RATE))
        # the agent hangs up by itself: the call ends without the caller doing anything
        ended = await line._until(lambda: line.ended, 20)
        call = line.call
    assert ended and call.ended_by_agent
    assert call.flow.nodes == ["start", "bye"]
    assert turn_texts(line)[-1] == "Bye."
    # the goodbye was played out whole before the line closed
    bye_audio = line.transport.recording()
    assert bye_audio.size and line.transport.cursor <= line.now + 0.05


@requires_espeak
async def test_transfer_call_reaches_the_transport_after_the_node_says_its_line(tmp_path, tiny_model):
    flow = """
    initial_node: start
    global_functions:
      - name: transfer_to_human
        transition_only: true
        description: The caller wants a person.
        transition_to: transfer
    nodes:
      start:
        respond_immediately: false
        task_messages: [{role: developer, content: Help.}]
      transfer:
        respond_immediately: false
        task_messages: [{role: developer, content: Transfer.}]
        pre_actions:
          - {type: say, text: Connecting.}
        post_actions:
          - {type: transfer_call, to: "+15551234567"}
    """
    runtime, _ = runtime_with(write_agent(tmp_path, flow, max_seconds=3), tiny_model, [[Call("transfer_to_human", {})]])
    async with InProcessCall(runtime) as line:
        await line.say(synthesize("Let me talk to a person.", RATE))
        ended = await line._until(lambda: line.ended, 20)
        call = line.call
    transfers = [e for e in line.transport.events if e[0] == "transfer"]
    assert ended and call.transferred_to == "+15551234567"
    assert [e[2] for e in transfers] == ["+15551234567"]
    assert turn_texts(line)[-1] == "Connecting."
    said = line.agent_audio()
    assert said and transfers[0][1] >= said[-1]  # the transfer waited for "Connecting." to play


@requires_espeak
async def test_keyed_digits_route_the_flow_and_the_agent_can_send_dtmf(tmp_path, tiny_model):
    flow = """
    initial_node: menu
    nodes:
      menu:
        respond_immediately: false
        task_messages: [{role: developer, content: Ask for the PIN.}]
        collect_dtmf:
          max_digits: 6
          terminator: "#"
          store_as: pin
          routes: {"42": staff}
          default: customer
      staff:
        task_messages: [{role: developer, content: "Staff PIN {{ pin }}."}]
        pre_actions:
          - {type: send_dtmf, digits: "9*"}
      customer:
        task_messages: [{role: developer, content: Customer.}]
    """
    runtime, _ = runtime_with(write_agent(tmp_path, flow), tiny_model, [])
    async with InProcessCall(runtime) as line:
        await line.wait(0.3)
        await line.press("42#")
        assert await line.quiet(settle=1.0)
        call = line.call
        session = call.service.session
    assert call.flow.nodes == ["menu", "staff"]
    assert [e[2] for e in line.transport.events if e[0] == "dtmf_out"] == ["9", "*"]
    assert call.dtmf_sent == ["9*"]
    history = session.tokenizer.decode(session.history_ids + session.pending_ids)
    assert "Staff PIN 42." in history


@requires_espeak
async def test_a_barge_in_during_a_tool_filler_cuts_it_and_the_caller_is_answered(tmp_path, tiny_model):
    filler = "Please hold on while I check that order for you."
    flow = ORDER_FLOW.replace("tools:\n", "tools:\n" + SLOW_TOOL % {"timeout": 8, "filler": filler}, 1)
    flow = flow.replace("- name: lookup_order\n        transition_to:", "- name: slow_lookup\n        transition_to:")
    agent = write_agent(tmp_path, flow, max_seconds=6.0, delay=5.0)
    runtime, _ = runtime_with(
        agent, tiny_model, [[Call("slow_lookup", {"order_id": "A17"})], ["Sure."]]
    )
    async with InProcessCall(runtime) as line:
        _, said_end = await line.say(synthesize("Where is my order?", RATE))
        filler_at = await line.agent_audio_after(said_end, timeout=10)
        assert filler_at is not None
        await line.wait(max(0.0, filler_at + 0.8 - line.now))
        cut_at, _ = await line.say(synthesize("Actually, never mind.", RATE))
        assert await line.quiet(settle=1.5, timeout=30)
        call = line.call
    stats = call.stats
    assert stats.barge_ins >= 1
    cut = [t for t in stats.texts if t and filler.startswith(t) and t != filler]
    assert cut, f"the filler was not cut short: {stats.texts}"  # kept text: a strict prefix of the filler
    assert stats.texts[-1] == "Sure."  # the barge-in turn got its own answer
    # nothing more of the filler played after the barge-in took effect (one chunk may be in flight)
    interrupted = [e[1] for e in line.transport.events if e[0] == "interruption" and e[1] > cut_at]
    assert interrupted
    answer_at = line.agent_audio(interrupted[0])
    late = [t for t in answer_at if t < interrupted[0] + 0.2]
    assert len(late) <= 1


def test_an_agent_whose_flow_names_an_unknown_node_does_not_load(tmp_path):
    flow = """
    initial_node: start
    nodes:
      start:
        task_messages: [{role: developer, content: Help.}]
        functions:
          - name: go
            transition_only: true
            description: Go.
            transition_to: nowhere
    """
    agent = write_agent(tmp_path, flow)
    with pytest.raises(AgentFileError) as caught:
        load_agent(agent)
    message = str(caught.value)
    assert f"{agent}:" in message and "flow:" in message
    assert "flow.yaml:" in message and "nowhere" in message
