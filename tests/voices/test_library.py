"""The voice library and `chroma-agent voice add|list|check|remove`."""

import datetime as dt

import numpy as np
import pytest
import soundfile

from agent.cli import main
from tests.speech import requires_espeak
from tests.voices.conftest import SENTENCE, save, speech
from voices.library import ENV, LibraryError, VoiceLibrary, default_library
from voices.profile import VoiceError, load_voice
from voices.validate import TARGET_LOUDNESS, measure_loudness

pytestmark = requires_espeak


@pytest.fixture
def recording(tmp_path):
    """Stereo MP3 at 44.1 kHz with silence around the speech: every conversion `add` makes."""
    audio = speech(rate=44100) * 0.3
    audio = np.concatenate([np.zeros(44100, np.float32), audio, np.zeros(22050, np.float32)])
    return save(tmp_path / "ava.mp3", np.stack([audio, audio], axis=1), 44100)


def test_add_stores_normalised_24k_mono_with_consent(tmp_path, recording):
    library = VoiceLibrary(tmp_path / "voices")
    voice = library.add("ava", audio=recording, transcript=SENTENCE, consent_by="Ava Smith",
                        consent_use="support line of Example Ltd")
    stored, rate = soundfile.read(str(voice.folder / "reference.wav"))
    assert voice.folder == tmp_path / "voices" / "ava"
    assert rate == 24000 and stored.ndim == 1
    assert stored.size / rate == pytest.approx(voice.seconds, abs=0.01) and voice.seconds < 6.5  # trimmed
    assert measure_loudness(stored.astype(np.float32)) == pytest.approx(TARGET_LOUDNESS, abs=1.0)
    assert "2 channels mixed down to mono" in voice.prepared.notes
    again = load_voice(voice.folder)
    consent = again.profile.consent
    assert (consent.given_by, consent.use, consent.date, consent.synthetic) == (
        "Ava Smith", "support line of Example Ltd", dt.date.today(), False)
    assert again.profile.source.file == "ava.mp3" and again.profile.source.sample_rate == 44100
    assert library.names() == ["ava"]


def test_add_writes_nothing_when_a_check_fails(tmp_path):
    library = VoiceLibrary(tmp_path / "voices")
    short = save(tmp_path / "short.wav", speech("Hi there."))
    with pytest.raises(VoiceError) as caught:
        library.add("leo", audio=short, transcript="Hi there.", consent_by="Leo")
    assert caught.value.problems[0].startswith(f"{short}: too short: ")
    assert library.names() == [] and not (tmp_path / "voices" / "leo").exists()


def test_names_are_checked_and_not_overwritten_by_accident(tmp_path, recording):
    library = VoiceLibrary(tmp_path / "voices")
    with pytest.raises(LibraryError, match="'Ava Smith' is not a voice name"):
        library.add("Ava Smith", audio=recording, transcript=SENTENCE, consent_by="Ava")
    library.add("ava", audio=recording, transcript=SENTENCE, consent_by="Ava")
    with pytest.raises(LibraryError, match="already in the library"):
        library.add("ava", audio=recording, transcript=SENTENCE, consent_by="Ava")
    replaced = library.add("ava", audio=recording, transcript=SENTENCE, consent_by="Ava S.", replace=True)
    assert replaced.profile.consent.given_by == "Ava S."
    with pytest.raises(LibraryError, match=r"no voice 'leo' in the library at .* \(voices there: ava\)"):
        library.load("leo")


def test_default_library_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))
    assert default_library() == tmp_path / "mine"
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_library() == tmp_path / "data" / "chroma-agents" / "voices"


def test_cli_add_list_check_remove(tmp_path, recording, capsys):
    lib = str(tmp_path / "voices")
    assert main(["voice", "add", "ava", "--audio", str(recording), "--transcript", SENTENCE,
                 "--consent-by", "Ava Smith", "--library", lib]) == 0
    out = capsys.readouterr().out
    assert "note: 2 channels mixed down to mono" in out and "added voice 'ava'" in out

    broken = tmp_path / "voices" / "bob"
    broken.mkdir()
    (broken / "voice.yaml").write_text("name: bob\ntranscript: Hi.\naudio: reference.wav\n")
    assert main(["voice", "list", "--library", lib]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["name", "seconds", "loudness", "status"]
    ava = rows[1].split()
    assert ava[0] == "ava" and 4 < float(ava[1]) < 6.5 and ava[2:4] == [f"{TARGET_LOUDNESS:.1f}", "LUFS"]
    assert ava[4] == "ok"
    assert rows[2].split() == ["bob", "-", "-", "1", "problem"]

    assert main(["voice", "check", "ava", "--library", lib]) == 0
    assert "consent: Ava Smith" in capsys.readouterr().out
    assert main(["voice", "check", "bob", "--library", lib]) == 1
    out = capsys.readouterr().out
    assert f"{broken / 'voice.yaml'}:1: consent: missing" in out and out.rstrip().endswith("1 problem")

    assert main(["voice", "remove", "bob", "--library", lib]) == 0
    assert not broken.exists()
    assert main(["voice", "remove", "bob", "--library", lib]) == 2
    assert "no voice 'bob' in the library" in capsys.readouterr().err


def test_cli_add_reports_every_problem_and_exits_2(tmp_path, capsys):
    quiet = save(tmp_path / "q.wav", speech("Hi.", 8000) * 0.001, 8000, subtype="FLOAT")
    assert main(["voice", "add", "q", "--audio", str(quiet), "--transcript", "Hi.", "--consent-by", "Q",
                 "--library", str(tmp_path / "voices")]) == 2
    err = capsys.readouterr().err
    assert "voice 'q' not added:" in err
    assert f"{quiet}: sample rate 8000 Hz is below 16000 Hz" in err
