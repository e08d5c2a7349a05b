"""Flow files in pipecat's own format, with their handlers modules: pipecat's `FlowConfig.from_file` and
`Flow` load the same files in each test (proof that they are pipecat's format), and `flow check`, the
agent file and a call take them unchanged. Our additions are listed as ours."""

import importlib.util
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from pipecat.flows import Flow, FlowConfig, FlowReferenceError
from pipecat.utils.yaml import include_loader
from pydantic import ValidationError

from agent.cli import main
from agent.spec import AgentFileError, load_agent
from flows.actions import action_handlers
from flows.file import load_flow
from flows.problems import FlowFileError
from flows.runtime import CallFlow
from flows.tools import run_tool
from tests.speech import requires_espeak, synthesize

ROOT = Path(__file__).resolve().parents[2]
RESTAURANT = ROOT / "examples" / "flows" / "restaurant"
INTAKE = ROOT / "examples" / "flows" / "patient_intake"
RATE = 16000
HANDLERS_CODE = '''
from pipecat.flows import TRANSITION_IN_YAML


async def collect_party_size(flow_manager, size: int):
    """Record the party size.

    Args:
        size: How many people.
    """
    flow_manager.state["party_size"] = size
    return {"size": size}, TRANSITION_IN_YAML


async def log_it(action, flow_manager):
    flow_manager.state["logged"] = True
'''
SMALL_FLOW = """
initial_node: start
nodes:
  start:
    task_messages: [{role: developer, content: Ask how many people.}]
    functions:
      - name: collect_party_size
        transition_to: done
  done:
    task_messages: [{role: developer, content: "Say a table for {{ party_size }}."}]
    post_actions:
      - {type: function, handler: log_it}
"""


def pipecat_module(path: Path):
    """The handlers module as a pipecat bot imports it, apart from our loader."""
    spec = importlib.util.spec_from_file_location(f"pipecat_handlers_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems(path: Path, **kwargs) -> list[str]:
    with pytest.raises(FlowFileError) as info:
        load_flow(path, **kwargs)
    return str(info.value).splitlines()


class Control:
    """The call side of a flow, recorded (what `CallControl` would carry out on a live call)."""

    def __init__(self):
        self.done: list[tuple] = []

    async def hang_up(self, after_current_sentence=True):
        self.done.append(("hang_up", after_current_sentence))

    async def transfer(self, target):
        self.done.append(("transfer", target))

    async def send_dtmf(self, digits):
        self.done.append(("dtmf", digits))

    async def play(self, wav_path):
        self.done.append(("play", wav_path))

    async def say(self, text):
        self.done.append(("say", text))

    async def set_voice(self, name):
        self.done.append(("voice", name))


# -- the same files, through pipecat's loader and ours ------------------------------------------------


def test_the_restaurant_flow_is_pipecats_format_and_loads_here_unchanged():
    config = FlowConfig.from_file(RESTAURANT / "flow.yaml")
    Flow(config, handlers=pipecat_module(RESTAURANT / "handlers.py"))  # raises if a reference is unresolved

    flow = load_flow(RESTAURANT / "flow.yaml")  # handlers.py beside the file is found by itself
    assert flow.config.model_dump() == config.model_dump()
    assert flow.extensions == [] and flow.tools == {}
    assert Path(flow.handlers.where) == RESTAURANT / "handlers.py"
    assert set(flow.handlers.actions) == {"notify_host"}  # registered in code by register_actions
    # !include: the role and the greeting come from their own files
    assert flow.config.nodes["greeting"].role_message.startswith("You are the host of La Piazza")
    assert flow.config.nodes["greeting"].task_messages[0].content.startswith("Welcome the caller")
    assert flow.config.nodes["confirm"].context_strategy == "reset"
    goodbye = flow.config.nodes["goodbye"]
    assert [a.type for a in goodbye.pre_actions] == ["function", "notify_host", "print_ticket"]
    assert [a.type for a in goodbye.post_actions] == ["tts_say", "end_conversation"]
    assert [a.type for a in flow.config.nodes["confirm"].pre_actions] == ["tts_say"]


def test_a_handlers_optional_argument_reaches_the_model_as_pipecat_generates_it():
    call_flow = CallFlow(load_flow(RESTAURANT / "flow.yaml"), Control())
    (check,) = [f for f in call_flow.node("get_time")["functions"] if f.name == "check_availability"]
    assert check.required == ["time"]
    assert check.properties["seating"]["anyOf"] == [{"type": "string"}, {"type": "null"}]
    assert check.description == "Check whether a table is free at a time."
    # the global transition_only function is built by pipecat's Flow too
    assert [f.name for f in call_flow.global_functions] == ["end_early"]


async def test_pipecats_speech_actions_are_carried_out_by_the_call():
    control = Control()
    call_flow = CallFlow(load_flow(RESTAURANT / "flow.yaml"), control)
    # tts_say becomes our say: spoken through the model, its placeholders filled from state when run
    assert call_flow.node("confirm")["pre_actions"][1] == {"type": "say", "text": "Good news, a table is free."}
    say, end = call_flow.node("goodbye")["post_actions"]
    assert say["type"] == "say" and end == {"type": "end_conversation", "text": "Goodbye!"}
    handlers = action_handlers(control)

    class Manager:
        state = {"party_size": 4, "reservation": {"name": "Rossi", "time": "7pm"}}

    await handlers["say"](say, Manager())
    await handlers["end_conversation"](end, Manager())
    await handlers["end_conversation"]({"type": "end_conversation"}, Manager())
    assert control.done == [
        ("say", "Rossi, your table for 4 is booked for 7pm."),
        ("say", "Goodbye!"),
        ("hang_up", True),
        ("hang_up", True),
    ]


async def test_handlers_from_the_module_have_a_time_limit_and_cannot_break_a_node(monkeypatch):
    import asyncio

    import flows.runtime as runtime

    call_flow = CallFlow(load_flow(RESTAURANT / "flow.yaml"), Control())
    # handler functions without a limit of their own get one (pipecat's is none)
    timeouts = {f.name: f.timeout_secs for f in call_flow.node("get_time")["functions"]}
    assert timeouts == {"check_availability": runtime.HANDLER_TIMEOUT_SECS}
    # action handlers named in the file are wrapped
    saving = call_flow.node("goodbye")["pre_actions"][1]
    assert saving["type"] == "function" and saving["handler"].__name__ == "run"

    monkeypatch.setattr(runtime, "HANDLER_TIMEOUT_SECS", 0.1)
    seen = []

    async def hangs(action, flow_manager):
        await asyncio.sleep(60)

    def raises(action, flow_manager):
        raise RuntimeError("broken")

    async def legacy(action):  # pipecat's runner also takes handlers of the action alone
        seen.append(action["type"])

    for kind, handler in (("hangs", hangs), ("raises", raises), ("legacy", legacy)):
        await asyncio.wait_for(runtime.guarded(kind, handler)({"type": kind}, object()), 5)
    assert seen == ["legacy"]


def test_a_json_flow_file_loads_like_the_yaml_one(tmp_path):
    with (RESTAURANT / "flow.yaml").open() as f:
        data = yaml.load(f, include_loader(RESTAURANT))  # the includes resolved, as pipecat reads them
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(data, indent=2))
    shutil.copy(RESTAURANT / "handlers.py", tmp_path / "handlers.py")
    theirs = FlowConfig.from_file(path)
    ours = load_flow(path)
    assert ours.config.model_dump() == theirs.model_dump() == FlowConfig.from_file(RESTAURANT / "flow.yaml").model_dump()
    # a problem in a JSON file is located by its line too
    broken = json.dumps(data, indent=2).replace('"transition_to": "goodbye"', '"transition_to": "nowhere"', 1)
    path.write_text(broken)
    line = next(i for i, text in enumerate(broken.splitlines(), 1) if '"nowhere"' in text)
    assert any(p.startswith(f"{path}:{line}: ") and "'nowhere' is not a node" in p for p in problems(path))


def test_the_intake_flow_uses_our_additions_and_pipecat_alone_rejects_it():
    with pytest.raises(ValidationError) as refused:
        FlowConfig.from_file(INTAKE / "flow.yaml")
    refused_keys = {e["loc"][-1] for e in refused.value.errors() if e["type"] == "extra_forbidden"}
    assert {"state", "tools", "collect_dtmf", "voice"} <= refused_keys

    flow = load_flow(INTAKE / "flow.yaml")
    fields = [e.split(": ")[1] for e in flow.extensions]
    assert fields[:2] == ["state", "tools"]
    assert "nodes.identify.collect_dtmf" in fields and "nodes.medications.voice" in fields
    assert "nodes.nurse.pre_actions[1].type" in fields  # send_dtmf
    assert "nodes.identify.functions[0].name" in fields  # names a tool under tools:
    assert "nodes.medications.functions[0].name" not in fields  # a handler: pipecat's own
    # with our keys taken out, what is left is pipecat's, and its Flow resolves every handler in it
    Flow(flow.pipecat_config(), handlers=pipecat_module(INTAKE / "handlers.py"))


async def test_a_tools_optional_argument_may_be_null_or_left_out_but_not_another_type():
    flow = load_flow(INTAKE / "flow.yaml")
    tool, function = flow.tools["find_patient"], flow.functions["find_patient"]
    for arguments in ({"birthday": "1984-03-07"}, {"birthday": "1984-03-07", "last_name": None}):
        outcome = await run_tool("find_patient", tool, arguments, {}, function=function)
        assert outcome.ok and outcome.result == {"found": True, "name": "Ada Lovelace"}
    outcome = await run_tool("find_patient", tool, {"birthday": "1984-03-07", "last_name": 7}, {}, function=function)
    assert not outcome.ok and "last_name is 7; expected string or null" in outcome.result["error"]


# -- flow check -----------------------------------------------------------------------------------------


def test_flow_check_passes_pipecats_files_and_names_our_keys_in_the_others(capsys):
    assert main(["flow", "check", str(RESTAURANT / "flow.yaml")]) == 0
    out = capsys.readouterr().out
    assert "pipecat's format: FlowConfig.from_file and Flow load this file as it is" in out
    # a placeholder only a handler sets: a note, not a problem
    assert f"note: {RESTAURANT / 'flow.yaml'}:29: nodes.get_time.task_messages[0].content: {{{{ party_size }}}}" in out

    assert main(["flow", "check", str(INTAKE / "flow.yaml")]) == 0
    out = capsys.readouterr().out
    assert "pipecat's format with this project's additions (13), which pipecat's FlowConfig and Flow alone cannot run:" in out
    assert f"  {INTAKE / 'flow.yaml'}:82: nodes.medications.voice: ours" in out
    assert f"  {INTAKE / 'flow.yaml'}:10: tools: ours" in out


def test_flow_check_finds_the_handlers_beside_the_file_or_where_handlers_says(tmp_path, capsys, monkeypatch):
    flow = write(tmp_path / "flows", "flow.yaml", SMALL_FLOW)
    code = write(tmp_path / "code", "booking_handlers.py", HANDLERS_CODE)
    FlowConfig.from_file(flow)  # pipecat's format

    assert main(["flow", "check", str(flow)]) == 1
    err = capsys.readouterr().err
    assert (
        f"{flow}:6: nodes.start.functions[0].name: 'collect_party_size' is not a tool; expected one declared "
        "under tools: (none declared), a direct function in a handlers module" in err
    )
    assert f"{flow}:11: nodes.done.post_actions[0].handler: 'log_it' cannot be found" in err

    assert main(["flow", "check", str(flow), "--handlers", str(code)]) == 0
    assert f"handlers from {code}" in capsys.readouterr().out

    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    assert main(["flow", "check", str(flow), "--handlers", "booking_handlers"]) == 0
    assert "handlers from booking_handlers" in capsys.readouterr().out
    sys.modules.pop("booking_handlers", None)

    shutil.copy(code, flow.with_name("handlers.py"))
    assert main(["flow", "check", str(flow)]) == 0
    Flow(FlowConfig.from_file(flow), handlers=pipecat_module(flow.with_name("handlers.py")))


def test_problems_with_handlers_and_pipecat_actions_are_listed_with_their_lines(tmp_path):
    write(
        tmp_path,
        "handlers.py",
        '''
        from pipecat.flows import TRANSITION_IN_YAML

        async def old_style(args, flow_manager):
            return {}, TRANSITION_IN_YAML

        def not_async(flow_manager, size: int):
            return {}, TRANSITION_IN_YAML

        async def fine(flow_manager):
            """Fine."""
            return {}, TRANSITION_IN_YAML

        def register_actions(flow_manager):
            flow_manager.register_action("notify", lambda action, flow_manager: None)
        ''',
    )
    path = write(
        tmp_path,
        "flow.yaml",
        """
        initial_node: a
        nodes:
          a:
            task_messages: [{role: developer, content: hi}]
            functions:
              - name: old_style
              - name: not_async
              - name: fine
              - name: absent
            pre_actions:
              - {type: function}
              - {type: function, handler: nothing_here}
              - {type: tts_say, text: hi, handler: fine}
              - {type: tts_say}
              - {type: unregistered}
              - {type: notify, channel: desk}
              - {type: custom, handler: fine}
              - {type: end_conversation, text: Bye.}
              - {type: tts_say, text: hi, priority: high}  # pipecat passes further keys through
        """,
    )
    lines = problems(path)
    expected = [
        (6, "nodes.a.functions[0].name", "'old_style' in "),
        (7, "nodes.a.functions[1].name", "'not_async' in "),
        (9, "nodes.a.functions[3].name", "'absent' is not a tool; expected one declared under tools: (none declared), a direct function in the handlers module"),
        (11, "nodes.a.pre_actions[0].handler", "missing; a function action names its handler"),
        (12, "nodes.a.pre_actions[1].handler", f"'nothing_here' is not a function in the handlers module {tmp_path / 'handlers.py'}"),
        (13, "nodes.a.pre_actions[2].handler", "unknown key; pipecat's built-in 'tts_say' action takes no handler"),
        (14, "nodes.a.pre_actions[3].text", "missing"),
        (15, "nodes.a.pre_actions[4].type", "'unregistered' is not allowed; expected one of tts_say, end_conversation, function, end_call, transfer_call, send_dtmf, play, say, notify, or a custom type"),
    ]
    assert len(lines) == len(expected), lines
    for line, (number, field, message) in zip(lines, expected, strict=True):
        assert line.startswith(f"{path}:{number}: {field}: {message}"), line
    assert "first parameter must be named 'flow_manager'" in lines[0]
    assert "must be async" in lines[1]
    # pipecat's own loader refuses the same signatures and names
    config = FlowConfig.model_validate(
        {"initial_node": "a", "nodes": {"a": {"task_messages": [{"role": "developer", "content": "hi"}],
         "functions": [{"name": n} for n in ("old_style", "not_async", "absent")]}}}
    )
    with pytest.raises(FlowReferenceError) as theirs:
        Flow(config, handlers=pipecat_module(tmp_path / "handlers.py"))
    assert [p.code for p in theirs.value.problems] == ["invalid_tool", "invalid_tool", "missing_tool"]


def test_a_handlers_module_that_cannot_load_is_reported_as_such(tmp_path):
    write(tmp_path, "handlers.py", "raise RuntimeError('no database')\n")
    path = write(tmp_path, "flow.yaml", SMALL_FLOW)
    (line,) = problems(path)
    assert line == f"{path}: handlers: {tmp_path / 'handlers.py'} raised RuntimeError: no database"
    write(tmp_path, "handlers.py", "async def register_actions(flow_manager):\n    pass\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}: handlers: {tmp_path / 'handlers.py'}: register_actions must be a plain function")


def test_include_reads_a_file_beside_the_flow_and_a_missing_one_is_located(tmp_path):
    write(tmp_path, "prompts/task.yaml", "- {role: developer, content: From the include.}\n")
    path = write(
        tmp_path,
        "flow.yaml",
        """
        initial_node: a
        nodes:
          a:
            task_messages: !include prompts/task.yaml
            role_message: !include prompts/missing.yaml
        """,
    )
    (line,) = problems(path)
    assert line.startswith(f"{path}:5: !include 'prompts/missing.yaml' cannot be read (No such file or directory")
    write(tmp_path, "prompts/missing.yaml", "Now here.\n")
    flow = load_flow(path)
    assert flow.config.nodes["a"].task_messages[0].content == "From the include."
    assert flow.config.model_dump() == FlowConfig.from_file(path).model_dump()


def test_a_placeholder_is_never_set_without_handlers_and_left_to_them_with(tmp_path):
    text = """
    initial_node: a
    nodes:
      a:
        task_messages: [{role: developer, content: "Call {{ caller_number }} about {{ order.id }}."}]
    """
    path = write(tmp_path, "flow.yaml", text)
    (line,) = problems(path)  # caller_number is every call's; order is set by nothing here
    assert line.startswith(f"{path}:4: nodes.a.task_messages[0].content: {{{{ order.id }}}} is never set")
    write(tmp_path, "handlers.py", "async def lookup(flow_manager):\n    flow_manager.state['order'] = {}\n")
    flow = load_flow(path)
    assert flow.notes == [
        f"{path}:4: nodes.a.task_messages[0].content: {{{{ order.id }}}} is left to the handlers (handlers.py "
        "mentions 'order'; not checked): unless one has put it in flow_manager.state by then, pipecat's "
        "FlowManager stops at this node"
    ]


def test_the_agent_file_names_the_handlers_module(tmp_path):
    flow = write(tmp_path / "flows", "flow.yaml", SMALL_FLOW)
    write(tmp_path / "code", "booking_handlers.py", HANDLERS_CODE)
    agent = tmp_path / "agent.yaml"
    base = f"name: t\nmodel: tiny\nvoice: {ROOT / 'examples/voices/demo'}\nflow: flows/flow.yaml\n"
    agent.write_text(base + "handlers: code/booking_handlers.py\n")
    spec = load_agent(agent)
    assert spec.handlers == str(tmp_path / "code" / "booking_handlers.py")
    assert spec.flow_file.handlers.lookup("collect_party_size") is not None

    agent.write_text(base + "handlers: code/missing.py\n")
    with pytest.raises(AgentFileError) as caught:
        load_agent(agent)
    assert f"{agent}:5: handlers: 'code/missing.py': no such file" in str(caught.value)

    agent.write_text(base)  # no handlers: and none beside the flow
    with pytest.raises(AgentFileError) as caught:
        load_agent(agent)
    assert "'collect_party_size' is not a tool" in str(caught.value)
    assert str(flow) in str(caught.value)


# -- the same files through a call ------------------------------------------------------------------
# The real pipeline on the tiny model with the in-process transport; only the thinker's choice of
# words is scripted (ScriptedReasoner), as in test_calls.py.


def agent_for(tmp_path: Path, flow: Path) -> Path:
    agent = tmp_path / "agent.yaml"
    agent.write_text(
        f"""
name: pipecat format agent
model: tiny
voice: {ROOT / "examples/voices/demo"}
flow: {flow}
turn: {{detector: silence, silence_secs: 0.4}}
response: {{max_seconds: 10}}
"""
    )
    return agent


def runtime_with(agent: Path, tiny_model, turns):
    from agent.runtime import AgentRuntime
    from processors.chroma.scripted import ScriptedReasoner

    reasoners = []

    def reasoner():
        reasoners.append(ScriptedReasoner(tiny_model.tokenizer, turns))
        return reasoners[-1]

    return AgentRuntime(load_agent(agent), model=tiny_model, reasoner=reasoner), reasoners


def logged(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@requires_espeak
async def test_the_restaurant_flow_runs_a_call_with_its_handlers_state_and_pipecats_actions(
    tmp_path, tiny_model, monkeypatch
):
    from agent.testing.inprocess import InProcessCall
    from processors.chroma.scripted import Call

    monkeypatch.setenv("RESTAURANT_LOG", str(tmp_path))
    turns = [
        ["Welcome to La Piazza."],  # the first node speaks first (respond_immediately)
        ["Sure. ", Call("collect_party_size", {"size": 4}), Call("check_availability", {"time": "7pm"}), "Ok."],
        [Call("confirm_reservation", {"name": "Rossi"}), "Done."],
    ]
    runtime, reasoners = runtime_with(agent_for(tmp_path, RESTAURANT / "flow.yaml"), tiny_model, turns)
    line = InProcessCall(runtime)
    line.call.flow_state["caller_number"] = "+15551230000"
    async with line:
        assert await line.quiet(settle=1.0, timeout=60)
        await line.say(synthesize("A table for four at seven, please.", RATE))
        assert await line.quiet(settle=1.5, timeout=90)
        await line.say(synthesize("Under Rossi.", RATE))
        ended = await line._until(lambda: line.ended, 90)
        call = line.call
    # handlers by name, with pipecat's signatures; their results (not the TRANSITION_IN_YAML marker)
    # went back to the thinker, and the YAML picked each next node from them
    assert call.tool_calls == [
        ("collect_party_size", {"size": 4}),
        ("check_availability", {"time": "7pm"}),  # the optional seating left out
        ("confirm_reservation", {"name": "Rossi"}),
    ]
    assert reasoners[0].results == [
        {"status": "ok", "size": 4},
        {"available": True, "time": "7pm"},
        {"booked": True, "name": "Rossi"},
    ]
    assert call.flow.nodes == ["greeting", "get_time", "confirm", "goodbye"]
    # the function action, the action registered in code and the one naming its handler, in order,
    # reading what the handlers put in flow_manager.state (and the caller's number, shared with it)
    assert logged(tmp_path / "bookings.jsonl") == [
        {"event": "saved", "caller": "+15551230000", "time": "7pm", "seating": "inside", "name": "Rossi"},
        {"event": "host_notified", "channel": "front-desk", "party_size": 4},
        {"event": "ticket", "copies": 2, "name": "Rossi"},
    ]
    # tts_say spoken through the model with its placeholders filled from state; end_conversation says
    # its text and hangs up
    texts = list(call.stats.texts)
    assert "Good news, a table is free." in texts  # on entering confirm, before the turn goes on
    assert texts[texts.index("Good news, a table is free.") + 1] == "Ok."
    assert texts[-3:] == ["Done.", "Rossi, your table for 4 is booked for 7pm.", "Goodbye!"]
    assert ended and call.ended_by_agent


@requires_espeak
async def test_the_intake_flow_runs_a_call_mixing_handlers_with_our_tools_and_actions(tmp_path, tiny_model, monkeypatch):
    from agent.testing.inprocess import InProcessCall
    from processors.chroma.scripted import Call

    monkeypatch.setenv("INTAKE_LOG", str(tmp_path))
    turns = [
        ["Hello. "],
        [
            Call("find_patient", {"birthday": "1984-03-07"}),  # a Python tool declared under tools:
            Call("record_medications", {"medications": ["aspirin"]}),  # handlers, pipecat's way
            Call("record_allergies", {}),  # its optional argument left out
            Call("record_visit_reason", {"reason": "a cough"}),
            "Thank you.",
        ],
    ]
    runtime, reasoners = runtime_with(agent_for(tmp_path, INTAKE / "flow.yaml"), tiny_model, turns)
    async with InProcessCall(runtime) as line:
        assert await line.quiet(settle=1.0, timeout=60)
        await line.say(synthesize("I was born on the seventh of March 1984.", RATE))
        ended = await line._until(lambda: line.ended, 90)
        call = line.call
    assert call.flow.nodes == ["identify", "medications", "allergies", "visit_reason", "done"]
    assert reasoners[0].results[0] == {"found": True, "name": "Ada Lovelace"}
    assert logged(tmp_path / "intake.jsonl") == [
        {
            "patient": {"found": True, "name": "Ada Lovelace"},  # the tool's result, kept under store_as
            "medications": ["aspirin"],
            "allergies": [],
            "visit_reason": "a cough",
            "caller_number": "",  # every call has it; empty off the phone
        }
    ]
    assert ended and call.ended_by_agent  # end_call after the function action
