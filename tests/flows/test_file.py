import textwrap
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from flows.file import load_flow
from flows.problems import FlowFileError
from processors.audio_io import write_wav

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "flows"


def write(tmp_path, text, name="flow.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems(path):
    with pytest.raises(FlowFileError) as info:
        load_flow(path)
    return str(info.value).splitlines()


def test_the_example_flows_load_and_pipecat_sees_only_its_own_format():
    service = load_flow(EXAMPLES / "customer_service" / "flow.yaml")
    booking = load_flow(EXAMPLES / "appointments" / "flow.yaml")
    assert service.config.initial_node == "greet"
    assert service.functions["find_customer"].__name__ == "find_customer"
    assert service.dtmf["greet"].default == "keyed_account"
    assert service.tools["lookup_order"].http.url.endswith("/orders/{{ order_id }}")
    transfer = service.config.nodes["transfer"].pre_actions
    assert [a.type for a in transfer] == ["say", "play", "transfer_call"]
    assert Path(transfer[1].extras()["wav"]).is_absolute()
    assert booking.dtmf["menu"].routes == {"1": "ask_date", "2": "front_desk"}
    assert set(booking.functions) == {"check_availability", "book_appointment"}
    # voice and collect_dtmf are ours: pipecat's node model has no such fields
    assert not hasattr(service.config.nodes["greet"], "voice")


def test_every_problem_is_reported_at_once_with_its_line(tmp_path):
    path = write(
        tmp_path,
        """
        initial_node: start
        tools:
          lookup:
            description: Look something up.
            parameters:
              type: object
              properties:
                id: {type: strng}
              required: [id, other]
            python: no_such_module_for_flows:lookup
        nodes:
          start:
            task_messages:
              - role: developer
                content: Hello {{ never_set }}
            functions:
              - name: lookup
                transition_to: nowhere
              - name: missing_tool
            collect_dtmf:
              max_digits: 99
            pre_actions:
              - type: transfer_call
                to: "555-1234"
              - type: play
                wav: nothing.wav
    """,
    )
    lines = problems(path)
    expected = [
        (8, "tools.lookup.parameters.properties.id.type", "'strng' is not a JSON type"),
        (9, "tools.lookup.parameters.required", "'other' is not one of the properties"),
        (10, "tools.lookup.python", "No module named 'no_such_module_for_flows'"),
        (15, "nodes.start.task_messages[0].content", "{{ never_set }} is never set"),
        (18, "nodes.start.functions[0].transition_to", "'nowhere' is not a node; expected one of start"),
        (
            19,
            "nodes.start.functions[1].name",
            "'missing_tool' is not a tool; expected one declared under tools: (lookup)",
        ),
        (21, "nodes.start.collect_dtmf.max_digits", "99 is not allowed; expected at most 32"),
        (24, "nodes.start.pre_actions[0].to", "'555-1234' is not allowed; expected an E.164 number"),
        (26, "nodes.start.pre_actions[1].wav", "'nothing.wav' is not allowed; expected an existing audio file"),
    ]
    assert len(lines) == len(expected), lines
    for line, (number, field, message) in zip(lines, expected, strict=True):
        assert line.startswith(f"{path}:{number}: {field}: "), line
        assert message in line, line


def test_invalid_yaml_names_its_line(tmp_path):
    path = write(
        tmp_path,
        """
        initial_node: a
        nodes:
          a: [unclosed
    """,
    )
    (line,) = problems(path)
    assert line.startswith(f"{path}:4: invalid YAML")


def test_unknown_and_duplicate_keys_are_problems(tmp_path):
    path = write(
        tmp_path,
        """
        initial_node: a
        nodez: {}
        nodes:
          a:
            task_messages: [{role: developer, content: hi}]
          a:
            task_messages: [{role: developer, content: again}]
            colour: blue
    """,
    )
    lines = problems(path)
    assert (
        f"{path}:2: nodez: unknown key; expected one of initial_node, nodes, global_functions, tools, state"
        in lines
    )
    assert f"{path}:6: nodes.a: duplicate key; first given on line 4" in lines
    assert f"{path}:8: nodes.a.colour: unknown key" in lines


def test_a_tool_module_next_to_the_flow_is_imported_and_its_faults_reported(tmp_path):
    (tmp_path / "good_tools.py").write_text("def lookup(order_id):\n    return {}\n")
    (tmp_path / "broken_tools.py").write_text("raise RuntimeError('no database configured')\n")
    path = write(
        tmp_path,
        """
        initial_node: a
        tools:
          works:
            description: d
            parameters: {type: object, properties: {order_id: {type: string}}}
            python: good_tools:lookup
          absent:
            description: d
            python: good_tools:nothing_here
          raises:
            description: d
            python: broken_tools:lookup
          mismatch:
            description: d
            parameters: {type: object, properties: {order: {type: string}}}
            python: good_tools:lookup
        nodes:
          a:
            task_messages: [{role: developer, content: hi}]
            functions: [{name: works}, {name: absent}, {name: raises}, {name: mismatch}]
          b:
            task_messages: [{role: developer, content: hi}]
            functions: [{name: works, description: Look it up.}]
    """,
    )
    lines = problems(path)
    assert lines == [
        f"{path}:9: tools.absent.python: 'good_tools:nothing_here' cannot be loaded: module 'good_tools' has no 'nothing_here'",
        f"{path}:12: tools.raises.python: 'broken_tools:lookup' cannot be loaded: "
        f"{tmp_path / 'broken_tools.py'} raised RuntimeError: no database configured",
        f"{path}:16: tools.mismatch.python: 'good_tools:lookup': the function takes no argument 'order', which parameters declares",
        f"{path}:16: tools.mismatch.python: 'good_tools:lookup': the function needs argument 'order_id', which parameters does not declare",
        f"{path}:23: nodes.b.functions[0].description: only a transition_only function takes a description; "
        "a handler describes itself in its docstring, a tool in its declaration under tools:",
    ]


def test_fields_a_tool_does_not_return_cannot_be_branched_on_or_shown(tmp_path):
    (tmp_path / "t.py").write_text("def find():\n    return {}\n")
    path = write(
        tmp_path,
        """
        initial_node: a
        tools:
          find:
            description: d
            python: t:find
            fields: [found, name]
            store_as: customer
        nodes:
          a:
            task_messages: [{role: developer, content: "Hello {{ customer.nmae }}, {{ customer.name }}"}]
            functions:
              - name: find
                transition_to: {field: fuond, cases: {true: a}}
    """,
    )
    lines = problems(path)
    assert lines == [
        f"{path}:10: nodes.a.task_messages[0].content: {{{{ customer.nmae }}}}: 'nmae' is not a field the tool returns; expected one of found, name",
        f"{path}:13: nodes.a.functions[0].transition_to.field: 'fuond' is not a field tool find returns; expected one of found, name",
    ]


def test_keypad_routes_that_no_caller_could_enter_are_problems(tmp_path):
    path = write(
        tmp_path,
        """
        initial_node: a
        nodes:
          a:
            task_messages: [{role: developer, content: hi}]
            collect_dtmf:
              max_digits: 2
              terminator: "#"
              routes: {"123": a, "1#": a, "x": a, "2": nowhere}
              on_timeout: gone
    """,
    )
    lines = problems(path)
    assert f"{path}:8: nodes.a.collect_dtmf.routes.123: '123' is longer than max_digits 2" in lines
    assert (
        f"{path}:8: nodes.a.collect_dtmf.routes.1#: '1#' holds the terminator '#', which ends the entry"
        in lines
    )
    assert any(
        line.startswith(f"{path}:8: nodes.a.collect_dtmf.routes.x: 'x' is not a key sequence")
        for line in lines
    )
    assert any(
        line.startswith(f"{path}:8: nodes.a.collect_dtmf.routes.2: 'nowhere' is not a node") for line in lines
    )
    assert any(
        line.startswith(f"{path}:9: nodes.a.collect_dtmf.on_timeout: 'gone' is not a node") for line in lines
    )


def test_action_arguments_are_checked(tmp_path):
    (tmp_path / "notes.txt").write_text("not audio")
    write_wav(tmp_path / "ok.wav", np.zeros(80, np.int16), 8000)
    path = write(
        tmp_path,
        """
        initial_node: a
        nodes:
          a:
            task_messages: [{role: developer, content: hi}]
            pre_actions:
              - {type: send_dtmf, digits: "12x"}
              - {type: play, wav: notes.txt}
              - {type: play, wav: ok.wav}
              - {type: say, text: "  "}
              - {type: end_call, after: 3}
              - {type: transfer_call, to: "sip:desk@pbx.example.com"}
              - {type: hangup}
    """,
    )
    lines = problems(path)
    assert len(lines) == 5, lines
    assert lines[0].startswith(
        f"{path}:6: nodes.a.pre_actions[0].digits: '12x' is not allowed; expected 1 to 32 DTMF digits"
    )
    assert lines[1].startswith(
        f"{path}:7: nodes.a.pre_actions[1].wav: 'notes.txt' is not allowed; expected a readable audio file ("
    )
    assert lines[2].startswith(
        f"{path}:9: nodes.a.pre_actions[3].text: '  ' is not allowed; expected the text to speak"
    )
    assert lines[3] == f"{path}:10: nodes.a.pre_actions[4].after: unknown key"
    assert lines[4] == (
        f"{path}:12: nodes.a.pre_actions[6].type: 'hangup' is not allowed; "
        "expected one of tts_say, end_conversation, function, end_call, transfer_call, send_dtmf, play, say, "
        "or a custom type with handler: naming a function in the handlers module (or registered by its "
        "register_actions)"
    )


def test_tool_declarations_are_checked(tmp_path):
    path = write(
        tmp_path,
        """
        initial_node: a
        tools:
          remote:
            description: d
            http: {url: "https://x.example/{{ id }}", headers: {Authorization: "Bearer ${not a name}"}}
          both:
            description: d
            python: m:f
            http: {url: "https://x.example/"}
          arrays:
            description: d
            parameters: {type: array}
            python: "not a reference"
            timeout_secs: "5"
        nodes:
          a:
            task_messages: [{role: developer, content: hi}]
    """,
    )
    lines = problems(path)
    assert (
        f"{path}:5: tools.remote.http.headers: header Authorization: ${{not a name}} is not allowed; expected ${{NAME}} with NAME an environment variable name"
        in lines
    )
    assert (
        f"{path}:6: tools.both: give exactly one of python: module:function or http: {{method, url}}" in lines
    )
    assert any(
        line.startswith(
            f"{path}:13: tools.arrays.python: 'not a reference' is not allowed; expected module:function"
        )
        for line in lines
    )
    assert f"{path}:14: tools.arrays.timeout_secs: '5' is not allowed; expected a number" in lines


def test_flow_check_exits_zero_on_a_good_file_and_one_listing_every_problem(tmp_path, capsys):
    good = main(["flow", "check", str(EXAMPLES / "appointments" / "flow.yaml")])
    out = capsys.readouterr().out
    path = write(
        tmp_path,
        """
        initial_node: nowhere
        nodes:
          a:
            task_messages: [{role: developer, content: "{{ x }}"}]
    """,
    )
    bad = main(["flow", "check", str(path)])
    err = capsys.readouterr().err.splitlines()
    assert good == 0 and "ok: 7 nodes, 2 tools, starts at 'menu'" in out
    assert bad == 1
    assert err[0].startswith(f"{path}:1: initial_node: 'nowhere' is not a node")
    assert err[1].startswith(f"{path}:4: nodes.a.task_messages[0].content: {{{{ x }}}} is never set")
    assert err[2] == f"{path}: 2 problems"


def test_flow_check_notes_environment_variables_a_tool_will_need(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SHOP_API_TOKEN", raising=False)
    assert main(["flow", "check", str(EXAMPLES / "customer_service" / "flow.yaml")]) == 0
    assert (
        "note: ${SHOP_API_TOKEN} is not set here; lookup_order will fail until it is"
        in capsys.readouterr().out
    )
    monkeypatch.setenv("SHOP_API_TOKEN", "x")
    assert main(["flow", "check", str(EXAMPLES / "customer_service" / "flow.yaml")]) == 0
    assert "note:" not in capsys.readouterr().out


def test_names_that_are_not_text_are_problems_not_crashes(tmp_path):
    path = write(
        tmp_path,
        """
        initial_node: [a]
        state: {1: x}
        nodes:
          2:
            task_messages: [{role: developer, content: hi}]
    """,
    )
    lines = problems(path)
    assert lines == [
        f"{path}:1: initial_node: a list is not a node; expected one of 2",
        f"{path}:2: state.1: 1 is not allowed as a state name; expected letters, digits and _",
        f"{path}:4: nodes.2: 2 is not allowed as a node name; expected text",
    ]


def test_a_node_voice_folder_is_relative_to_the_flow_file_and_must_hold_a_voice(tmp_path):
    (tmp_path / "voices" / "ava").mkdir(parents=True)
    (tmp_path / "voices" / "ava" / "voice.yaml").write_text("name: ava\n")
    (tmp_path / "voices" / "empty").mkdir()
    node = "    task_messages: [{role: developer, content: hello}]\n"
    flows = tmp_path / "flows"
    flows.mkdir()
    good = write(flows, f"initial_node: a\nnodes:\n  a:\n    voice: ../voices/ava\n{node}  b:\n    voice: leo\n{node}")
    assert load_flow(good).voices == {"a": str(tmp_path / "voices" / "ava"), "b": "leo"}  # a name: the library's
    bad = write(flows, f"initial_node: a\nnodes:\n  a:\n    voice: ../voices/empty\n{node}", "bad.yaml")
    assert problems(bad) == [
        f"{bad}:4: nodes.a.voice: '../voices/empty' is not a voice folder (looked for "
        f"{tmp_path / 'voices' / 'empty' / 'voice.yaml'}); expected a folder holding voice.yaml, or a voice name "
        "from the library"
    ]
