import shutil
from pathlib import Path

import pytest
from pydantic import BaseModel

from agent.spec import AgentFileError, AgentSpec, load_agent

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "agents" / "demo" / "agent.yaml"

# The smallest valid agent; it is 4 lines, so a snippet added after it starts on line 5.
BASE = "name: Test agent\nvoice: ./voice\n# a copy of the demo voice\n#\n"


@pytest.fixture
def folder(tmp_path):
    shutil.copytree(ROOT / "examples" / "voices" / "demo", tmp_path / "voice", ignore=shutil.ignore_patterns("codes"))
    (tmp_path / "voice.wav").write_bytes(b"RIFF")  # a file that is not a model folder
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "agent.yaml"
    path.write_text(text)
    return path


def problems(path: Path, **kwargs) -> AgentFileError:
    with pytest.raises(AgentFileError) as caught:
        load_agent(path, **kwargs)
    return caught.value


# -- the example and valid files ------------------------------------------------------------------------


def test_demo_agent_loads_with_its_derived_values():
    spec = load_agent(DEMO)
    voices = ROOT / "examples" / "voices" / "demo"
    assert spec.name == "Demo support agent"
    assert spec.model_source == "FlashLabs/Chroma-4B"
    assert spec.device == "auto"
    assert spec.path == DEMO
    assert spec.voice_folder == voices and spec.voice_folder.is_absolute()
    assert spec.voice_profile.transcript.startswith("Hello, thanks for calling.")
    assert spec.voice_profile.profile.consent.synthetic
    assert "customer-service" in spec.system_prompt
    assert spec.response.max_seconds == 30 and spec.response.max_frames == 375
    assert (
        spec.transports.webrtc.enabled
        and not spec.transports.twilio.enabled
        and not spec.transports.sip.enabled
    )


def test_demo_agent_writes_out_every_default(folder):
    demo, minimal = load_agent(DEMO), load_agent(write(folder, BASE))
    for section in ("vad", "turn", "response", "transports"):
        assert getattr(demo, section) == getattr(minimal, section), section
    assert (minimal.model, minimal.device, minimal.system_prompt) == ("tiny", "auto", "")


def test_paths_are_relative_to_the_agent_file_not_the_working_directory(
    folder, tmp_path_factory, monkeypatch
):
    (folder / "weights").mkdir()
    path = write(folder, BASE + "model: weights\n")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    spec = load_agent(path)
    assert spec.voice_folder == folder.resolve() / "voice"
    assert spec.model_source == str(folder.resolve() / "weights")


def test_an_int_is_taken_where_a_number_is_expected(folder):
    spec = load_agent(write(folder, BASE + "response:\n  max_seconds: 12\n  temperature: 1\n"))
    assert spec.response.temperature == 1.0 and isinstance(spec.response.temperature, float)
    assert spec.response.max_frames == 150


def test_max_frames_rounds_down(folder):
    assert load_agent(write(folder, BASE + "response:\n  max_seconds: 1.5\n")).response.max_frames == 18


def test_every_field_is_documented_and_path_is_not_in_the_schema():
    def check(model: type[BaseModel]):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                check(field.annotation)

    check(AgentSpec)
    assert "path" not in AgentSpec.model_json_schema()["properties"]


# -- one rule at a time -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "snippet, line, expected",
    [
        ("device: gpu\n", 5, "device: 'gpu' is not allowed; expected auto, cpu, cuda or cuda:N"),
        ("device: 'cuda:x'\n", 5, "device: 'cuda:x' is not allowed; expected auto, cpu, cuda or cuda:N"),
        ("system_prompt: 42\n", 5, "system_prompt: 42 is not allowed; expected a string"),
        (
            "vad:\n  analyzer: rnnoise\n",
            6,
            "vad.analyzer: 'rnnoise' is not allowed; expected one of 'webrtc', 'silero'",
        ),
        (
            "vad:\n  aggressiveness: 7\n",
            6,
            "vad.aggressiveness: 7 is not allowed; expected an integer from 0 to 3",
        ),
        (
            "vad:\n  aggressiveness: 2.5\n",
            6,
            "vad.aggressiveness: 2.5 is not allowed; expected an integer from 0 to 3",
        ),
        (
            "vad:\n  aggressiveness: true\n",
            6,
            "vad.aggressiveness: true is not allowed; expected an integer from 0 to 3",
        ),
        ("vad:\n  frame_ms: 25\n", 6, "vad.frame_ms: 25 is not allowed; expected one of 10, 20, 30"),
        (
            "vad:\n  confidence: 0\n",
            6,
            "vad.confidence: 0 is not allowed; expected a number greater than 0 and at most 1",
        ),
        ("vad:\n  start_secs: 2.5\n", 6, "vad.start_secs: 2.5 is not allowed; expected a number from 0 to 2"),
        ("vad:\n  stop_secs: -1\n", 6, "vad.stop_secs: -1 is not allowed; expected a number from 0 to 5"),
        (
            "vad:\n  min_volume: '0.5'\n",
            6,
            "vad.min_volume: '0.5' is not allowed; expected a number from 0 to 1",
        ),
        (
            "vad: 5\n",
            5,
            "vad: 5 is not allowed; expected a mapping with keys analyzer, aggressiveness, frame_ms",
        ),
        (
            "turn:\n  detector: vad\n",
            6,
            "turn.detector: 'vad' is not allowed; expected one of 'smart_turn', 'silence'",
        ),
        (
            "turn:\n  silence_secs: 0.05\n",
            6,
            "turn.silence_secs: 0.05 is not allowed; expected a number from 0.1 to 5",
        ),
        (
            "response:\n  max_seconds: 0\n",
            6,
            "response.max_seconds: 0 is not allowed; expected a number from 1 to 300",
        ),
        (
            "response:\n  max_seconds:\n",
            6,
            "response.max_seconds: null is not allowed; expected a number from 1 to 300",
        ),
        (
            "response:\n  chunk_frames: 5\n",
            6,
            "response.chunk_frames: 5 is not allowed; expected an integer from 1 to 4",
        ),
        (
            "response:\n  lookahead: 9\n",
            6,
            "response.lookahead: 9 is not allowed; expected an integer from 1 to 8",
        ),
        (
            "response:\n  temperature: 2.5\n",
            6,
            "response.temperature: 2.5 is not allowed; expected a number from 0 to 2",
        ),
        (
            "response:\n  top_k: 0\n",
            6,
            "response.top_k: 0 is not allowed; expected an integer from 1 to 1000",
        ),
        (
            "response:\n  allow_interruptions: 'yes'\n",
            6,
            "response.allow_interruptions: 'yes' is not allowed; expected true or false",
        ),
        (
            "transports:\n  twilio: {enabled: 1}\n",
            6,
            "transports.twilio.enabled: 1 is not allowed; expected true or false",
        ),
        # a value on the line after its key is reported on its own line
        (
            "vad:\n  aggressiveness:\n    9\n",
            7,
            "vad.aggressiveness: 9 is not allowed; expected an integer from 0 to 3",
        ),
    ],
)
def test_each_rule_names_file_line_field_and_value(folder, snippet, line, expected):
    path = write(folder, BASE + snippet)
    error = problems(path)
    assert str(error).startswith(f"{path}:{line}: {expected}")
    assert error.path == path and len(error.problems) == 1
    assert error.problems[0][:2] == (line, expected.split(":")[0])


def test_name_must_be_a_non_empty_string(folder):
    path = write(folder, "# agent\nname: '  '\nvoice: ./voice\n")
    assert str(problems(path)) == f"{path}:2: name: '  ' is not allowed; expected a non-empty string"


def test_missing_required_fields_point_at_the_parent(folder):
    path = write(folder, "model: tiny\n\nvoice: ./voice\n")
    assert str(problems(path)).splitlines() == [f"{path}:1: name: missing; expected a non-empty string"]
    path = write(folder, "name: Test\n")
    assert str(problems(path)) == f"{path}:1: voice: missing; expected a non-empty string"


# -- unknown keys, several errors, YAML itself ----------------------------------------------------------


def test_unknown_key_with_a_suggestion(folder):
    path = write(folder, BASE + "vad:\n  analyzer: webrtc\n  agressiveness: 2\n")
    assert str(problems(path)) == f"{path}:7: vad.agressiveness: unknown key; did you mean 'aggressiveness'?"


def test_unknown_key_without_a_close_match_lists_the_keys(folder):
    path = write(folder, "colour: blue\n" + BASE)
    assert str(problems(path)) == (
        f"{path}:1: colour: unknown key; expected one of name, model, device, engine, max_sessions, drain_seconds, voice, system_prompt, vad, turn, "
        "response, transports, outbound, handlers, records, flow"
    )


def test_path_is_set_by_the_loader_not_the_file(folder):
    path = write(folder, BASE + "path: other.yaml\n")
    assert str(problems(path)).startswith(f"{path}:5: path: unknown key; expected one of name, model")


def test_duplicate_keys_are_errors(folder):
    path = write(folder, BASE + "name: Other\n")
    assert str(problems(path)) == f"{path}:5: name: duplicate key; first given on line 1"


def test_several_errors_are_reported_together_in_line_order(folder):
    path = write(
        folder,
        "name: Test\n#\nvoice: ./gone\n#\nturn:\n  detectr: silence\nvad:\n  frame_ms: 15\n",
    )
    error = problems(path)
    assert [(line, field) for line, field, _ in error.problems] == [
        (3, "voice"),
        (6, "turn.detectr"),
        (8, "vad.frame_ms"),
    ]
    lines = str(error).splitlines()
    assert len(lines) == 3
    assert lines[1] == f"{path}:6: turn.detectr: unknown key; did you mean 'detector'?"
    assert lines[2] == f"{path}:8: vad.frame_ms: 15 is not allowed; expected one of 10, 20, 30"


def test_yaml_syntax_error_has_its_line(folder):
    path = write(folder, "name: Test\nvoice: ./voice\n#\nsystem_prompt: a: b\n")
    error = problems(path)
    assert str(error) == f"{path}:4: invalid YAML: mapping values are not allowed here"
    assert error.problems == [(4, "", "invalid YAML: mapping values are not allowed here")]


def test_empty_file_and_non_mapping_top_level(folder):
    path = write(folder, "# nothing yet\n")
    assert str(problems(path)) == f"{path}: the file is empty; expected a mapping with name and voice"
    path = write(folder, "\n- name: Test\n")
    assert str(problems(path)) == f"{path}:2: a list at the top level; expected a mapping with name and voice"


def test_unreadable_file(folder):
    path = folder / "absent.yaml"
    assert str(problems(path)).startswith(f"{path}: cannot be read (No such file or directory)")


# -- model ------------------------------------------------------------------------------------------------


def test_model_in_the_file(folder):
    assert (
        load_agent(write(folder, BASE + "model: FlashLabs/Chroma-4B\n")).model_source == "FlashLabs/Chroma-4B"
    )
    path = write(folder, BASE + "model: ./weights\n")
    assert str(problems(path)) == (
        f"{path}:5: model: './weights' does not exist (looked for {folder.resolve() / 'weights'}); "
        "expected a checkpoint folder"
    )
    path = write(folder, BASE + "model: not a model\n")
    assert str(problems(path)) == (
        f"{path}:5: model: 'not a model' is not 'tiny', an existing folder, or a Hugging Face id 'org/name'"
    )
    path = write(folder, BASE + "model: voice.wav\n")
    assert str(problems(path)).startswith(f"{path}:5: model: 'voice.wav' is a file (")


def test_model_override(folder, tmp_path_factory, monkeypatch):
    path = write(folder, BASE + "model: FlashLabs/Chroma-4B\n")
    assert load_agent(path, model="tiny").model_source == "tiny"
    assert load_agent(path, model="someone/chroma-ft").model_source == "someone/chroma-ft"
    weights = tmp_path_factory.mktemp("weights")
    assert load_agent(path, model=str(weights)).model_source == str(weights.resolve())
    # a relative override comes from the command line, so it is relative to the working directory
    monkeypatch.chdir(weights.parent)
    assert load_agent(path, model=weights.name).model_source == str(weights.resolve())
    assert str(problems(path, model="./gone")) == (
        f"{path}: model: './gone' does not exist (looked for {weights.parent.resolve() / 'gone'}); "
        "expected a checkpoint folder (given as the model override)"
    )


def test_model_override_replaces_a_bad_model_in_the_file(folder):
    assert load_agent(write(folder, BASE + "model: ./missing\n"), model="tiny").model_source == "tiny"


# -- voice ------------------------------------------------------------------------------------------------


def test_a_voice_by_name_comes_from_the_library(folder, tmp_path_factory, monkeypatch):
    library = tmp_path_factory.mktemp("library")
    shutil.copytree(folder / "voice", library / "ava")
    path = write(folder, BASE.replace("voice: ./voice", "voice: ava"))
    assert load_agent(path, library=library).voice_folder == library / "ava"
    monkeypatch.setenv("CHROMA_AGENTS_VOICES", str(library))
    spec = load_agent(path)
    assert spec.voice_folder == library / "ava" and spec.voice_profile.name == "demo"
    assert spec.voice_library.root == library


def test_an_unknown_voice_name_lists_the_library(folder, tmp_path_factory):
    library = tmp_path_factory.mktemp("library")
    shutil.copytree(folder / "voice", library / "ava")
    path = write(folder, BASE.replace("voice: ./voice", "voice: leo"))
    assert str(problems(path, library=library)) == (
        f"{path}:2: voice: no voice 'leo' in the library at {library} (voices there: ava); "
        "add one with `chroma-agent voice add`"
    )


def test_a_voice_folder_must_exist(folder):
    path = write(folder, BASE.replace("./voice", "../voices/missing"))
    assert str(problems(path)) == (
        f"{path}:2: voice: '../voices/missing' is not a folder (looked for "
        f"{folder.resolve().parent / 'voices' / 'missing'}); expected a voice folder holding voice.yaml"
    )


def test_the_old_inline_voice_is_refused_with_the_way_forward(folder):
    path = write(folder, "name: Test\nvoice:\n  audio: voice.wav\n  transcript: Hi.\n")
    message = str(problems(path))
    assert message.startswith(f"{path}:2: voice: a mapping is not allowed; expected a voice name")
    assert "chroma-agent voice add" in message


def test_a_voice_without_consent_fails_the_agent_file(folder):
    profile = folder / "voice" / "voice.yaml"
    kept = [line for line in profile.read_text().splitlines() if not line.startswith(("consent", "  "))]
    profile.write_text("\n".join(kept) + "\n")
    path = write(folder, BASE)
    message = str(problems(path))
    assert message.startswith(f"{path}:2: voice: './voice' cannot be used: {profile.resolve()}:")
    assert "consent: missing; a voice loads only with a consent record" in message


def test_the_voices_a_flow_names_load_with_the_agent_and_a_missing_one_fails_the_file(folder, tmp_path_factory):
    library = tmp_path_factory.mktemp("library")
    shutil.copytree(folder / "voice", library / "ava")
    flows = folder / "flows"
    flows.mkdir()
    node = "    task_messages: [{role: developer, content: hello}]\n"
    (flows / "flow.yaml").write_text(
        f"initial_node: a\nnodes:\n  a:\n    voice: ava\n{node}  b:\n    voice: ../voice\n{node}"
    )
    spec = load_agent(write(folder, BASE + "flow: flows/flow.yaml\n"), library=library)
    assert set(spec.flow_voices) == {str(library / "ava"), str(folder / "voice")}
    assert all(v.name == "demo" for v in spec.flow_voices.values())

    (flows / "flow.yaml").write_text(f"initial_node: a\nnodes:\n  a:\n    voice: leo\n{node}")
    path = write(folder, BASE + "flow: flows/flow.yaml\n")
    assert str(problems(path, library=library)) == (
        f"{path}:5: flow: 'flows/flow.yaml': node 'a': voice: no voice 'leo' in the library at {library} "
        "(voices there: ava); add one with `chroma-agent voice add`"
    )
