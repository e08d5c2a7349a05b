import re
import wave

import numpy as np
import pytest

from agent.cli import main
from processors.audio_io import to_pcm16

FRAME = 1920  # samples per 80 ms frame at 24 kHz


def _write_wav(path, audio, rate, channels=1):
    pcm = to_pcm16(audio)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


@pytest.fixture
def wavs(tmp_path):
    rng = np.random.RandomState(3)
    t = np.arange(16000 * 2) / 16000
    voice = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.05 * rng.randn(t.size)
    user = 0.1 * rng.randn(8000, 2)  # 1 s, 8 kHz stereo: exercises mix-down and resampling
    return {
        "voice": _write_wav(tmp_path / "voice.wav", voice, 16000),
        "input": _write_wav(tmp_path / "user.wav", user.reshape(-1), 8000, channels=2),
        "output": tmp_path / "reply.wav",
    }


def _argv(wavs, *extra, **override):
    paths = {**wavs, **override}
    return [
        "speak", "--model", "tiny", "--voice-audio", str(paths["voice"]), "--voice-text", "Hello, this is my voice.",
        "--consent-by", "Test Speaker",
        "--input", str(paths["input"]), "--output", str(paths["output"]), "--max-frames", "12", *extra,
    ]


def test_speak_writes_the_streamed_reply(wavs, capsys):
    assert main(_argv(wavs, "--system-prompt", "You are helpful.", "--device", "cpu")) == 0
    out = capsys.readouterr().out
    frames = int(re.search(r"^frames: (\d+)$", out, re.M).group(1))
    assert 0 < frames <= 12
    assert re.search(r"^time to first audio: \d+ ms$", out, re.M)
    assert re.search(r"^real-time factor: \d+\.\d+", out, re.M)
    assert "noise, not speech" in out
    with wave.open(str(wavs["output"]), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert w.getnframes() == frames * FRAME


@pytest.mark.parametrize("chunk_frames", ["1", "4"])
def test_speak_chunk_sizes_give_whole_frames(wavs, capsys, chunk_frames):
    assert main(_argv(wavs, "--chunk-frames", chunk_frames)) == 0
    frames = int(re.search(r"^frames: (\d+)$", capsys.readouterr().out, re.M).group(1))
    with wave.open(str(wavs["output"]), "rb") as w:
        assert w.getnframes() == frames * FRAME > 0


def test_missing_input_names_the_path(wavs, tmp_path, capsys):
    missing = tmp_path / "nowhere.wav"
    assert main(_argv(wavs, input=missing)) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--input" in err
    assert "Traceback" not in err
    assert not wavs["output"].exists()


def test_bad_chunk_frames_names_the_flag(wavs, capsys):
    assert main(_argv(wavs, "--chunk-frames", "7")) == 2
    err = capsys.readouterr().err
    assert "--chunk-frames" in err and "7" in err and "1 to 4" in err


def test_not_a_wav_is_refused(wavs, tmp_path, capsys):
    bogus = tmp_path / "notes.wav"
    bogus.write_text("this is not audio")
    assert main(_argv(wavs, voice=bogus)) == 2
    err = capsys.readouterr().err
    assert str(bogus) in err and "--voice-audio" in err


def test_8_bit_input_is_read_and_empty_wavs_are_refused(wavs, tmp_path, capsys):
    eight_bit = tmp_path / "8bit.wav"
    with wave.open(str(eight_bit), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(16000)
        w.writeframes(bytes(range(256)) * 16)
    assert main(_argv(wavs, input=eight_bit)) == 0
    capsys.readouterr()

    empty = _write_wav(tmp_path / "empty.wav", np.zeros(0), 16000)
    assert main(_argv(wavs, input=empty)) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no audio" in err


def test_bad_model_exits_2(wavs, tmp_path, capsys):
    assert main(_argv(wavs) + ["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "config.json" in err
