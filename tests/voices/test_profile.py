"""voice.yaml: the consent record is required; every problem names the file, line and field."""

import datetime as dt

import numpy as np
import pytest

from tests.speech import requires_espeak
from tests.voices.conftest import DEMO_VOICE, save, speech
from voices.profile import VoiceError, load_voice


def rewrite(folder, old: str, new: str) -> None:
    profile = folder / "voice.yaml"
    text = profile.read_text()
    assert old in text
    profile.write_text(text.replace(old, new))


def problems(folder) -> list[str]:
    with pytest.raises(VoiceError) as caught:
        load_voice(folder)
    return caught.value.problems


def test_the_example_voice_loads_and_says_it_is_synthetic():
    voice = load_voice(DEMO_VOICE)
    assert voice.name == "demo" and voice.profile.language == "en"
    assert voice.transcript.startswith("Hello, thanks for calling.")
    assert voice.profile.consent.synthetic and "espeak-ng" in voice.profile.consent.given_by
    assert voice.audio.dtype == np.float32 and 3 <= voice.seconds <= 30


def test_a_voice_without_consent_does_not_load(demo_voice):
    text = (demo_voice / "voice.yaml").read_text()
    kept = [line for line in text.splitlines() if not line.startswith(("consent", "  "))]
    (demo_voice / "voice.yaml").write_text("\n".join(kept) + "\n")
    assert problems(demo_voice) == [
        f"{demo_voice / 'voice.yaml'}:1: consent: missing; a voice loads only with a consent record: "
        "given_by (who), date (when) and use (for what)"
    ]


def test_each_consent_field_is_required_and_checked(demo_voice):
    path = demo_voice / "voice.yaml"
    rewrite(demo_voice, "  use: examples, demos, tests and benchmarks of chroma-agents\n", "")
    rewrite(demo_voice, "'2026-11-22'", "'2999-01-01'")
    rewrite(demo_voice, "  given_by: 'no one:", "  given_by: '  '\n  by_whom: 'no one:")
    lines = path.read_text().splitlines()
    line_of = {line.strip().split(":")[0]: n for n, line in enumerate(lines, 1)}
    found = problems(demo_voice)
    assert len(found) == 4
    assert f"{path}:{line_of['consent']}: consent.use: missing" in found
    assert f"{path}:{line_of['date']}: consent.date: 2999-01-01 is in the future; expected the date consent was given" in found
    assert any(p.startswith(f"{path}:{line_of['given_by']}: consent.given_by: '  ' is not allowed") for p in found)
    assert any(p.startswith(f"{path}:{line_of['by_whom']}: consent.by_whom: unknown key; expected one of given_by")
               for p in found)


def test_transcript_name_and_audio_are_checked(demo_voice):
    path = demo_voice / "voice.yaml"
    rewrite(demo_voice, "name: demo", "name: Demo Voice!")
    rewrite(demo_voice, "audio: reference.wav", "audio: ../elsewhere/reference.wav")
    found = problems(demo_voice)
    assert f"{path}:2: name: 'Demo Voice!' is not a voice name; expected 1 to 64 lowercase letters, digits, '-' or " \
           "'_', starting with a letter or digit" in found
    assert f"{path}:5: audio: '../elsewhere/reference.wav' is a path; expected the name of a file in the voice's " \
           "folder" in found


def test_a_missing_folder_or_profile_is_named(tmp_path):
    assert problems(tmp_path / "absent") == [f"{tmp_path / 'absent'}: no such voice folder"]
    assert problems(tmp_path) == [
        f"{tmp_path / 'voice.yaml'}: no such file; a voice folder holds voice.yaml and its reference recording"
    ]
    (tmp_path / "voice.yaml").write_text("name: x\n  bad: [\n")
    assert problems(tmp_path)[0].startswith(f"{tmp_path / 'voice.yaml'}:2: invalid YAML")


@requires_espeak
def test_audio_problems_name_the_recording(demo_voice):
    save(demo_voice / "reference.wav", speech("Hi."))
    found = problems(demo_voice)
    assert found[0].startswith(f"{demo_voice / 'reference.wav'}: too short: ")


def test_a_date_written_as_text_or_as_a_yaml_date_is_taken(demo_voice):
    assert load_voice(demo_voice).profile.consent.date == dt.date(2026, 11, 22)  # quoted in the example
    rewrite(demo_voice, "'2026-11-22'", "2026-11-20")
    assert load_voice(demo_voice).profile.consent.date == dt.date(2026, 11, 20)
