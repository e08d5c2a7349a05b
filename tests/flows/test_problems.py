"""An agent file, a flow file and a scenario file report their problems the same way, through
flows.problems: `file:line: field: message`, each located on its line."""

import shutil
from pathlib import Path

import pytest

from agent.spec import AgentFileError, load_agent
from agent.testing.pipecat_evals import load_scenarios
from agent.testing.scenario import ScenarioFileError
from flows.file import load_flow
from flows.problems import FlowFileError, YAMLFileError

ROOT = Path(__file__).resolve().parents[2]

# Each kind of file: how it loads, its error, a valid start (whose last line is 3), a wrong field added
# after it (on line 4 or 5), the problem that field gives, and what the top level should hold.
KINDS = {
    "agent": (
        load_agent,
        AgentFileError,
        "name: Test agent\nvoice: ./voice\n#\n",
        "vad:\n  aggressiveness: 7\n",
        (5, "vad.aggressiveness", "7 is not allowed; expected an integer from 0 to 3"),
        "a mapping with name and voice",
    ),
    "flow": (
        load_flow,
        FlowFileError,
        "initial_node: a\nnodes:\n  a: {task_messages: [{role: developer, content: hi}]}\n",
        "  b:\n    task_messages: 5\n",
        (5, "nodes.b.task_messages", "5 is not allowed; expected a list"),
        "a mapping with initial_node and nodes",
    ),
    "scenario": (
        load_scenarios,
        ScenarioFileError,
        "scenarios:\n  - name: greeting\n    turns: [{user: hello}]\n",
        "runs: 0\n",
        (4, "runs", "0 is not allowed; expected a whole number of runs >= 1"),
        "a mapping with a scenarios list",
    ),
}


@pytest.fixture(params=list(KINDS))
def kind(request, tmp_path):
    if request.param == "agent":  # an agent file loads only with its voice
        voice = ROOT / "examples" / "voices" / "demo"
        shutil.copytree(voice, tmp_path / "voice", ignore=shutil.ignore_patterns("codes"))
    return KINDS[request.param]


def problems(kind, path: Path) -> YAMLFileError:
    load, error = kind[0], kind[1]
    with pytest.raises(error) as caught:
        load(path)
    assert isinstance(caught.value, YAMLFileError)
    return caught.value


def test_the_valid_start_loads(kind, tmp_path):
    path = tmp_path / "file.yaml"
    path.write_text(kind[2])
    assert kind[0](path) is not None


def test_a_wrong_field_is_reported_on_its_line_with_its_field(kind, tmp_path):
    path = tmp_path / "file.yaml"
    path.write_text(kind[2] + kind[3])
    error = problems(kind, path)
    line, field, message = kind[4]
    assert error.problems == [(line, field, message)]
    assert str(error) == f"{path}:{line}: {field}: {message}"


def test_a_key_given_twice_is_reported_at_the_second(kind, tmp_path):
    path = tmp_path / "file.yaml"
    path.write_text(kind[2] + "#\nx: 1\nx: 2\n")
    assert f"{path}:6: x: duplicate key; first given on line 5" in str(problems(kind, path)).splitlines()


def test_bad_yaml_is_reported_on_its_line(kind, tmp_path):
    path = tmp_path / "file.yaml"
    path.write_text(kind[2] + "#\nbroken: a: b\n")
    assert str(problems(kind, path)) == f"{path}:5: invalid YAML: mapping values are not allowed here"


def test_an_empty_file_and_a_list_say_what_the_top_level_should_hold(kind, tmp_path):
    path = tmp_path / "file.yaml"
    path.write_text("# nothing yet\n")
    assert str(problems(kind, path)) == f"{path}: the file is empty; expected {kind[5]}"
    path.write_text("#\n- a\n")
    assert str(problems(kind, path)) == f"{path}:2: a list at the top level; expected {kind[5]}"


def test_a_missing_file_cannot_be_read(kind, tmp_path):
    path = tmp_path / "absent.yaml"
    assert str(problems(kind, path)).startswith(f"{path}: cannot be read (No such file or directory)")
