"""Each check on a reference recording, with audio made to break it."""

import re

import numpy as np
import pytest

from tests.speech import requires_espeak, speech_bounds
from tests.voices.conftest import RATE, SENTENCE, save, speech
from voices.validate import MAX_SECONDS, MIN_SECONDS, TARGET_LOUDNESS, measure_loudness, prepare_audio

pytestmark = requires_espeak


def only_problem(prepared, start: str) -> str:
    assert len(prepared.problems) == 1, prepared.problems
    assert prepared.problems[0].startswith(start), prepared.problems[0]
    return prepared.problems[0]


def test_clean_speech_passes_and_is_stored_as_24k_mono(tmp_path):
    prepared = prepare_audio(save(tmp_path / "ref.wav", speech(rate=16000), 16000), SENTENCE)
    assert prepared.ok, prepared.problems
    assert prepared.source_rate == 16000 and prepared.channels == 1
    assert prepared.audio.dtype == np.float32 and prepared.audio.ndim == 1
    assert prepared.audio.size == pytest.approx(prepared.seconds * RATE, abs=1)
    assert MIN_SECONDS <= prepared.seconds <= MAX_SECONDS


@pytest.mark.parametrize("suffix,kwargs", [(".flac", {}), (".ogg", {"subtype": "VORBIS"}), (".mp3", {})])
def test_flac_ogg_and_mp3_are_read(tmp_path, suffix, kwargs):
    prepared = prepare_audio(save(tmp_path / f"ref{suffix}", speech(), **kwargs), SENTENCE)
    assert prepared.ok, prepared.problems
    assert prepared.seconds == pytest.approx(prepare_audio(save(tmp_path / "ref.wav", speech()), SENTENCE).seconds,
                                             abs=0.15)


def test_other_formats_and_undecodable_files_are_named(tmp_path):
    aiff = save(tmp_path / "ref.aiff", speech(), format="AIFF")
    only_problem(prepare_audio(aiff), "'.aiff' files are not accepted; expected WAV, FLAC, MP3 or OGG")
    broken = tmp_path / "ref.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    only_problem(prepare_audio(broken), "WAV header without a data chunk")
    only_problem(prepare_audio(tmp_path / "absent.flac"), "no such file")


def test_too_short(tmp_path):
    text = "Hello there."
    problem = only_problem(prepare_audio(save(tmp_path / "ref.wav", speech(text)), text), "too short: ")
    assert f"expected at least {MIN_SECONDS:g} s: too little of the voice" in problem


def test_too_long(tmp_path):
    audio = np.concatenate([speech()] * 8)
    assert audio.size / RATE > MAX_SECONDS
    problem = only_problem(prepare_audio(save(tmp_path / "ref.wav", audio), " ".join([SENTENCE] * 8)), "too long: ")
    assert f"expected at most {MAX_SECONDS:g} s" in problem and "every turn" in problem


def test_mostly_silence(tmp_path):
    words = speech("Hello there, thanks.")
    audio = np.concatenate([words, np.zeros(8 * RATE, np.float32), words])  # inner silence is not trimmed
    prepared = prepare_audio(save(tmp_path / "ref.wav", audio), "Hello there, thanks. Hello there, thanks.")
    only_problem(prepared, "mostly silence: speech in ")
    assert prepared.speech_fraction < 0.4


def test_silent_audio(tmp_path):
    only_problem(prepare_audio(save(tmp_path / "ref.wav", np.zeros(5 * RATE, np.float32)), SENTENCE),
                 "no speech found: the audio is silent")


def test_clipped(tmp_path):
    audio = np.clip(speech() * 12, -1.0, 1.0)
    problem = only_problem(prepare_audio(save(tmp_path / "ref.wav", audio, subtype="FLOAT"), SENTENCE), "clipped: ")
    assert "of samples at full scale, expected at most 0.1%" in problem


def test_a_loud_but_unclipped_peak_is_not_clipping(tmp_path):
    audio = speech()
    audio = audio / np.abs(audio).max()  # one sample touches full scale
    assert prepare_audio(save(tmp_path / "ref.wav", audio, subtype="FLOAT"), SENTENCE).ok


def test_too_quiet_is_measured_in_lufs(tmp_path):
    audio = speech()
    audio = audio * 10 ** ((-52 - measure_loudness(audio)) / 20)
    prepared = prepare_audio(save(tmp_path / "ref.wav", audio, subtype="FLOAT"), SENTENCE)
    problem = only_problem(prepared, "too quiet: -5")
    assert "LUFS, expected at least -45 LUFS" in problem
    assert prepared.loudness == pytest.approx(-52, abs=0.5) and "noise" in problem


def test_quiet_and_loud_speech_are_normalised_to_the_target(tmp_path):
    audio = speech()
    quiet = audio * 10 ** ((-38 - measure_loudness(audio)) / 20)
    loud = 0.9 * np.tanh(5 * audio / np.abs(audio).max())  # compressed: loud without touching full scale
    assert measure_loudness(loud) > -14
    for recording in (quiet, loud):
        level = measure_loudness(recording)
        prepared = prepare_audio(save(tmp_path / "ref.wav", recording, subtype="FLOAT"), SENTENCE)
        assert prepared.ok, prepared.problems
        assert prepared.loudness == pytest.approx(level, abs=0.5)
        assert measure_loudness(prepared.audio) == pytest.approx(TARGET_LOUDNESS, abs=1.0)
        assert np.abs(prepared.audio).max() <= 10 ** (-1 / 20) + 1e-6
        assert prepared.gain_db == pytest.approx(TARGET_LOUDNESS - level, abs=1.0)
        assert f"loudness {prepared.loudness:.1f} LUFS, normalised by {prepared.gain_db:+.1f} dB" in prepared.notes[-1]


def test_multi_channel_is_mixed_down_with_a_note(tmp_path):
    audio = speech()
    stereo = np.stack([audio, 0.5 * audio], axis=1)
    prepared = prepare_audio(save(tmp_path / "ref.wav", stereo), SENTENCE)
    assert prepared.ok and prepared.channels == 2
    assert "2 channels mixed down to mono" in prepared.notes
    assert prepared.audio.ndim == 1


def test_sample_rate_below_16k(tmp_path):
    problem = only_problem(prepare_audio(save(tmp_path / "ref.wav", speech(rate=8000), 8000), SENTENCE),
                           "sample rate 8000 Hz is below 16000 Hz")
    assert "muffled" in problem


def test_leading_and_trailing_silence_is_trimmed(tmp_path):
    audio = speech()
    start, end = speech_bounds(audio, RATE)
    padded = np.concatenate([np.zeros(2 * RATE, np.float32), audio, np.zeros(3 * RATE, np.float32)])
    prepared = prepare_audio(save(tmp_path / "padded.wav", padded), SENTENCE)
    assert prepared.ok
    assert prepared.seconds == pytest.approx(end - start + 0.2, abs=0.06)  # the speech and 0.1 s either side
    leading, trailing = (float(x) for x in re.findall(r"([\d.]+) s of", prepared.notes[0]))
    assert leading == pytest.approx(2 + start - 0.1, abs=0.03) and trailing > 3


@pytest.mark.parametrize(
    "transcript,start",
    [
        ("   ", "transcript is empty"),
        ("Hi.", "transcript too short for the audio: 2 letters for"),
        (SENTENCE * 8, "transcript too long for the audio: "),
    ],
)
def test_transcript_must_fit_the_speech(tmp_path, transcript, start):
    problem = only_problem(prepare_audio(save(tmp_path / "ref.wav", speech()), transcript), start)
    if "letters" in problem:
        assert "expected 2.5 to 25" in problem


def test_every_problem_is_reported_at_once(tmp_path):
    audio = np.clip(speech("Hello there.", 8000) * 12, -1, 1)
    prepared = prepare_audio(save(tmp_path / "ref.wav", audio, 8000, subtype="FLOAT"), "")
    starts = sorted(p.split(":")[0].split(" ")[0] for p in prepared.problems)
    assert starts == ["clipped", "sample", "too", "transcript"]
