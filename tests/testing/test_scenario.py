import textwrap
from pathlib import Path

import pytest

from agent.testing.pipecat_evals import find_scenario_files, load_scenarios
from agent.testing.scenario import ScenarioFileError
from flows.problems import FlowFileError

EXAMPLE_WAV = Path(__file__).resolve().parents[2] / "examples" / "audio" / "hello.wav"


def write(folder: Path, text: str, name: str = "calls.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ScenarioFileError) as info:
        load_scenarios(path)
    return str(info.value).splitlines()


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "caller.wav").write_bytes(EXAMPLE_WAV.read_bytes())
    (tmp_path / "agent.yaml").write_text("name: x\n")
    (tmp_path / "script.py").write_text("turns = []\n")
    return tmp_path


VALID = """
agent: agent.yaml
transport: twilio
runs: 3
scenarios:
  - name: order status
    runs: 5
    script: script.py:turns
    turns:
      - user: "Hi, I'd like to check my order."
        pause_ms: 300
        expect:
          - event: bot_started_speaking
            within_ms: 1500
      - audio: caller.wav
      - dtmf: "1234#"
        expect:
          - event: function_call
            name: lookup_order
      - silence_ms: 2000
      - user: "Wait, stop."
        barge_in_after_ms: 800
        expect:
          - event: bot_stopped_speaking
            within_ms: 300
          - event: kept_text_prefix
      - audio: caller.wav
        barge_in_at_text: "your order"
    expect:
      - event: node_reached
        node: lookup_order
      - event: function_call
        name: lookup_order
        arguments: {order_id: "A17", options: {express: true}}
      - event: dtmf_sent
        digits: "1"
      - event: call_ended
        by: agent
      - event: call_transferred
        to: "+15551234567"
      - event: not_node_reached
        node: transfer
    limits:
      first_audio_ms: {p50: 800, p95: 1500}
      barge_in_stop_ms: {p95: 300}
  - name: just hello
    turns:
      - user: hello
"""


def test_a_valid_file_loads_into_the_dataclasses(folder):
    loaded = load_scenarios(write(folder, VALID))
    assert loaded.agent == (folder / "agent.yaml").resolve()
    assert loaded.transport == "twilio"
    order, hello = loaded.scenarios
    assert (order.name, order.runs, order.line) == ("order status", 5, 5)
    assert hello.runs == 3  # the file's default
    assert order.script == ((folder / "script.py").resolve(), "turns")
    assert [t.kind for t in order.turns] == ["user", "audio", "dtmf", "silence", "user", "audio"]
    first, audio, dtmf, silence, stop, at_text = order.turns
    assert (first.text, first.pause_ms, first.line) == ("Hi, I'd like to check my order.", 300.0, 9)
    assert first.expect[0].event == "bot_started_speaking"
    assert (first.expect[0].within_ms, first.expect[0].line) == (1500.0, 12)
    assert audio.wav == (folder / "caller.wav").resolve() and audio.wav.is_absolute()
    assert dtmf.digits == "1234#"
    assert dtmf.expect[0].params == {"name": "lookup_order"} and dtmf.expect[0].within_ms is None
    assert silence.silence_ms == 2000.0 and silence.pause_ms == 0.0
    assert stop.barge_in_after_ms == 800.0 and stop.barges_in
    assert [e.event for e in stop.expect] == ["bot_stopped_speaking", "kept_text_prefix"]
    assert at_text.barge_in_at_text == "your order" and at_text.barge_in_after_ms is None
    assert [e.event for e in order.expect] == [
        "node_reached",
        "function_call",
        "dtmf_sent",
        "call_ended",
        "call_transferred",
        "not_node_reached",
    ]
    call = order.expect[1]
    assert call.params == {
        "name": "lookup_order",
        "arguments": {"order_id": "A17", "options": {"express": True}},
    }
    assert call.line == 31
    assert order.expect[2].params == {"digits": "1"}
    assert order.expect[3].params == {"by": "agent"}
    assert order.expect[4].params == {"to": "+15551234567"}
    assert order.limits == {
        "first_audio_ms": {"p50": 800.0, "p95": 1500.0},
        "barge_in_stop_ms": {"p95": 300.0},
    }
    assert order.limit_lines == {
        "first_audio_ms.p50": 43,
        "first_audio_ms.p95": 43,
        "barge_in_stop_ms.p95": 44,
    }


def test_defaults_when_optional_keys_are_left_out(folder):
    loaded = load_scenarios(write(folder, "scenarios:\n  - name: a\n    turns:\n      - dtmf: '5'\n"))
    assert loaded.agent is None and loaded.transport is None
    (scenario,) = loaded.scenarios
    assert (scenario.runs, scenario.expect, scenario.limits, scenario.script) == (1, [], {}, None)


WRAP = """
scenarios:
  - name: one
    turns:
{turns}
"""

# (turns, as indented YAML under `turns:`), the line, the field, words the message must hold
TURN_CASES = [
    (
        "      - user: hi\n        barge_in_after_ms: -5",
        5,
        "scenarios[0].turns[0].barge_in_after_ms",
        "-5 is not allowed; expected a number of milliseconds >= 0",
    ),
    (
        "      - dtmf: '12x'",
        4,
        "scenarios[0].turns[0].dtmf",
        "'12x' is not allowed; expected a quoted string of DTMF",
    ),
    ("      - dtmf: -12", 4, "scenarios[0].turns[0].dtmf", "-12 is not allowed"),
    ("      - audio: missing.wav", 4, "scenarios[0].turns[0].audio", "'missing.wav' not found"),
    ("      - audio: script.py", 4, "scenarios[0].turns[0].audio", "'script.py' is not usable audio: not audio"),
    ("      - silence_ms: -1", 4, "scenarios[0].turns[0].silence_ms", "-1 is not allowed"),
    (
        "      - user: hi\n        pause_ms: soon",
        5,
        "scenarios[0].turns[0].pause_ms",
        "'soon' is not allowed; expected a number of milliseconds",
    ),
    (
        "      - user: hi\n        dtmf: '1'",
        4,
        "scenarios[0].turns[0]",
        "has user and dtmf; expected exactly one of",
    ),
    (
        "      - pause_ms: 3\n        barge_in_after_ms: 3",
        5,
        "scenarios[0].turns[0].barge_in_after_ms",
        "not allowed on a no-input turn",
    ),
    (
        "      - silence_ms: 5\n        barge_in_after_ms: 3",
        5,
        "scenarios[0].turns[0].barge_in_after_ms",
        "not allowed on a silence_ms turn",
    ),
    (
        "      - user: hi\n        barge_in_after_ms: 3\n        barge_in_at_text: x",
        6,
        "scenarios[0].turns[0].barge_in_at_text",
        "not allowed with barge_in_after_ms",
    ),
    (
        "      - user: hi\n        barge_in_ms: 3",
        5,
        "scenarios[0].turns[0].barge_in_ms",
        "unknown key; did you mean 'barge_in_after_ms'?",
    ),
    (
        "      - user: hi\n        expect:\n          - event: bot_started_talking",
        6,
        "scenarios[0].turns[0].expect[0].event",
        "did you mean 'bot_started_speaking'?",
    ),
    (
        "      - user: hi\n        expect:\n          - event: call_ended",
        6,
        "scenarios[0].turns[0].expect[0].event",
        "'call_ended' is not allowed in a turn's expect",
    ),
    (
        "      - user: hi\n        expect:\n          - event: kept_text_prefix",
        6,
        "scenarios[0].turns[0].expect[0].event",
        "needs a barge-in turn",
    ),
    (
        "      - user: hi\n        expect:\n          - event: bot_started_speaking\n            within_ms: -2",
        7,
        "scenarios[0].turns[0].expect[0].within_ms",
        "-2 is not allowed",
    ),
    (
        "      - user: hi\n        expect:\n          - event: function_call\n            arguments: {a: 1}\n"
        "            args: {a: 1}",
        8,
        "scenarios[0].turns[0].expect[0].args",
        "not allowed with arguments",
    ),
    (
        "      - user: hi\n        expect:\n          - event: function_call\n            nme: f",
        7,
        "scenarios[0].turns[0].expect[0].nme",
        "unknown key for function_call; did you mean 'name'?",
    ),
    ("      - user: ''", 4, "scenarios[0].turns[0].user", "'' is not allowed; expected the caller's words"),
]


@pytest.mark.parametrize(("turns", "line", "field", "words"), TURN_CASES)
def test_each_bad_turn_is_named_by_file_line_and_field(folder, turns, line, field, words):
    path = write(folder, WRAP.format(turns=turns))
    found = problems(path)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}:{line}: {field}: "), found
    assert words in found[0]


SCENARIO_CASES = [
    (
        "scenarios:\n  - turns:\n      - user: hi\n",
        2,
        "scenarios[0].name",
        "missing; expected the scenario's name",
    ),
    (
        "scenarios:\n  - name: a\n    turns:\n      - user: hi\n  - name: a\n    turns:\n      - user: ho\n",
        5,
        "scenarios[1].name",
        "'a' is not allowed; expected a name not used before (scenarios[0] has it)",
    ),
    ("scenarios:\n  - name: a\n", 2, "scenarios[0].turns", "missing; expected a list of turns"),
    (
        "scenarios:\n  - name: a\n    turns: []\n",
        3,
        "scenarios[0].turns",
        "empty; expected at least one turn",
    ),
    (
        "scenarios:\n  - name: a\n    runs: 0\n    turns:\n      - user: hi\n",
        3,
        "scenarios[0].runs",
        "0 is not allowed; expected a whole number of runs >= 1",
    ),
    (
        "scenarios:\n  - name: a\n    script: nowhere.py:turns\n    turns:\n      - user: hi\n",
        3,
        "scenarios[0].script",
        "'nowhere.py' not found",
    ),
    (
        "scenarios:\n  - name: a\n    script: script.py\n    turns:\n      - user: hi\n",
        3,
        "scenarios[0].script",
        "'script.py' is not allowed; expected \"file.py:attribute\"",
    ),
    (
        "scenarios:\n  - name: a\n    turns:\n      - user: hi\n    expect:\n      - event: bot_started_speaking\n",
        6,
        "scenarios[0].expect[0].event",
        "(bot_started_speaking goes in a turn's expect)",
    ),
    (
        "scenarios:\n  - name: a\n    turns:\n      - user: hi\n    expect:\n      - event: dtmf_sent\n"
        "        digits: '9z'\n",
        7,
        "scenarios[0].expect[0].digits",
        "'9z' is not allowed",
    ),
    (
        "scenarios:\n  - name: a\n    turns:\n      - user: hi\n    expect:\n      - event: call_ended\n"
        "        by: nobody\n",
        7,
        "scenarios[0].expect[0].by",
        "'nobody' is not allowed; expected agent or caller",
    ),
    (
        "scenarios:\n  - name: a\n    turns:\n      - user: hi\n    limits:\n      first_audio: {p50: 3}\n",
        6,
        "scenarios[0].limits.first_audio",
        "unknown key; did you mean 'first_audio_ms'?",
    ),
    (
        "scenarios:\n  - name: a\n    turns:\n      - user: hi\n    limits:\n      barge_in_stop_ms:\n        p99: 3\n",
        7,
        "scenarios[0].limits.barge_in_stop_ms.p99",
        "unknown key; did you mean 'p95'?",
    ),
    (
        "scenarios:\n  - name: a\n    turns:\n      - user: hi\n    limits:\n      barge_in_stop_ms:\n        p95: -3\n",
        7,
        "scenarios[0].limits.barge_in_stop_ms.p95",
        "-3 is not allowed",
    ),
    (
        "transport: pigeon\nscenarios:\n  - name: a\n    turns:\n      - user: hi\n",
        1,
        "transport",
        "'pigeon' is not allowed; expected one of inprocess, twilio, sip, webrtc",
    ),
    (
        "agent: nope.yaml\nscenarios:\n  - name: a\n    turns:\n      - user: hi\n",
        1,
        "agent",
        "'nope.yaml' not found",
    ),
    ("scenario:\n  - name: a\n", 1, "scenario", "unknown key; did you mean 'scenarios'?"),
    ("runs: 2\n", 1, "scenarios", "missing; expected a list of scenarios"),
]


@pytest.mark.parametrize(("text", "line", "field", "words"), SCENARIO_CASES)
def test_each_bad_scenario_is_named_by_file_line_and_field(folder, text, line, field, words):
    path = write(folder, text)
    found = problems(path)
    assert any(p.startswith(f"{path}:{line}: {field}: ") and words in p for p in found), found


def test_every_problem_is_listed_at_once_in_line_order(folder):
    path = write(
        folder,
        """
        scenarios:
          - name: a
            runs: -1
            turns:
              - dtmf: "E"
              - user: hi
                barge_in_after_ms: -5
            expect:
              - event: function_call
                name: ""
        """,
    )
    found = problems(path)
    assert [p.split(": ")[0] for p in found] == [f"{path}:3", f"{path}:5", f"{path}:7", f"{path}:10"]
    assert found[2] == (
        f"{path}:7: scenarios[0].turns[1].barge_in_after_ms: -5 is not allowed; "
        "expected a number of milliseconds >= 0"
    )


def test_bad_yaml_an_empty_file_a_duplicate_key_and_a_missing_file(folder):
    assert problems(write(folder, "scenarios: [\n"))[0].startswith(f"{folder / 'calls.yaml'}:2: invalid YAML")
    assert "the file is empty" in problems(write(folder, ""))[0]
    dup = write(folder, "scenarios:\n  - name: a\n    name: b\n    turns:\n      - user: hi\n")
    assert f"{dup}:3: scenarios[0].name: duplicate key; first given on line 2" in problems(dup)
    missing = problems(folder / "absent.yaml")
    assert missing[0].startswith(f"{folder / 'absent.yaml'}: cannot be read")


def test_the_error_is_a_value_error_and_a_flow_file_error():
    assert issubclass(ScenarioFileError, ValueError) and issubclass(ScenarioFileError, FlowFileError)


def test_find_scenario_files_keeps_files_and_searches_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    b = write(tmp_path, "scenarios: []\n", "b.yaml")
    a = write(tmp_path / "sub", "scenarios: []\n", "a.yml")
    write(tmp_path, "name: an agent file\n", "agent.yaml")
    (tmp_path / "notes.txt").write_text("scenarios:\n")
    given = tmp_path / "elsewhere.yaml"
    assert find_scenario_files([given, tmp_path]) == [given, b, a]
    assert find_scenario_files([b, tmp_path]) == [b, a]  # each once


def test_the_example_scenarios_and_their_agent_load():
    from agent.spec import load_agent

    root = Path(__file__).resolve().parents[2] / "examples" / "scenarios"
    files = find_scenario_files([root])
    assert files
    for path in files:
        loaded = load_scenarios(path)
        assert loaded.scenarios and loaded.agent is not None
        assert load_agent(loaded.agent).flow_file is not None
