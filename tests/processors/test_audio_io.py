"""Audio files in and out: every format and layout libsndfile reads, and each way a file can be unusable."""

import wave

import numpy as np
import pytest
import soundfile

from processors.audio_io import (
    AudioFileError,
    read_audio,
    read_audio_channels,
    read_audio_native,
    to_float,
    to_pcm16,
    write_wav,
)

TONE_HZ = 440.0


def tone(rate: int, seconds: float = 0.5, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)


def dominant_hz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return float(np.fft.rfftfreq(audio.size, 1 / rate)[np.argmax(spectrum)])


def wav_bytes(tmp_path, rate=16000, seconds=0.2) -> bytes:
    path = tmp_path / "whole.wav"
    write_wav(path, tone(rate, seconds), rate)
    return path.read_bytes()


@pytest.mark.parametrize(
    "suffix,fmt,subtype",
    [
        (".wav", "WAV", "PCM_16"),
        (".wav", "WAV", "PCM_24"),
        (".wav", "WAV", "PCM_32"),
        (".wav", "WAV", "FLOAT"),
        (".wav", "WAV", "DOUBLE"),
        (".wav", "WAV", "PCM_U8"),
        (".flac", "FLAC", "PCM_24"),
        (".ogg", "OGG", "VORBIS"),
        (".mp3", "MP3", None),
    ],
)
def test_every_format_reads_as_the_same_tone_at_the_asked_rate(tmp_path, suffix, fmt, subtype):
    path = tmp_path / f"tone{suffix}"
    soundfile.write(str(path), tone(44100, 1.0), 44100, format=fmt, subtype=subtype)
    audio = read_audio(path, 16000)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.size == pytest.approx(16000, abs=1200)  # MP3 and Vorbis pad a little
    assert dominant_hz(audio, 16000) == pytest.approx(TONE_HZ, abs=3)
    assert np.abs(audio).max() == pytest.approx(0.5, abs=0.06)


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 24000, 44100, 48000, 96000])
def test_any_rate_is_resampled_to_the_asked_one(tmp_path, rate):
    path = tmp_path / "tone.wav"
    write_wav(path, tone(rate), rate)
    native, file_rate = read_audio_native(path)
    assert file_rate == rate and native.size == rate // 2
    for target in (8000, 16000, 24000):
        audio = read_audio(path, target)
        assert audio.size == pytest.approx(target // 2, abs=1)
        assert dominant_hz(audio, target) == pytest.approx(TONE_HZ, abs=3)


def test_channels_are_averaged_to_mono(tmp_path):
    left, right = tone(16000), -0.5 * tone(16000)
    path = tmp_path / "stereo.wav"
    soundfile.write(str(path), np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    samples, rate = read_audio_channels(path)
    assert samples.shape == (8000, 2) and rate == 16000
    np.testing.assert_allclose(read_audio(path), (left + right) / 2, atol=1e-6)

    path = tmp_path / "six.flac"
    soundfile.write(str(path), np.repeat(left[:, None], 6, axis=1), 16000)
    assert read_audio_channels(path)[0].shape == (8000, 6)
    np.testing.assert_allclose(read_audio(path), left, atol=1e-4)


def test_int16_survives_a_float_round_trip_and_a_file(tmp_path):
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    assert np.array_equal(to_pcm16(to_float(pcm)), pcm)
    assert np.array_equal(to_float(pcm.tobytes()), to_float(pcm))
    path = tmp_path / "all.wav"
    write_wav(path, pcm, 8000)
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 8000)
        assert np.array_equal(np.frombuffer(w.readframes(w.getnframes()), "<i2"), pcm)
    assert np.array_equal(to_pcm16(read_audio(path)), pcm)


def test_float_to_int16_clips_and_rounds_to_nearest():
    floats = np.array([-2.0, -1.0, -0.5, 0.0, 1.4 / 32768, 1.6 / 32768, -1.6 / 32768, 0.5, 1.0, 3.0])
    assert to_pcm16(floats).tolist() == [-32768, -32768, -16384, 0, 1, 2, -2, 16384, 32767, 32767]
    assert to_pcm16(floats).dtype == np.int16
    written = to_pcm16(np.float32([0.25, -0.25]))
    assert written.tolist() == [8192, -8192]


def test_missing_empty_and_folder(tmp_path):
    with pytest.raises(AudioFileError) as missing:
        read_audio(tmp_path / "nowhere.wav")
    assert str(missing.value) == f"{tmp_path / 'nowhere.wav'}: no such file"
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioFileError, match=r"empty file \(0 bytes\)") as caught:
        read_audio(empty)
    assert caught.value.path == empty and str(caught.value).startswith(f"{empty}: ")
    with pytest.raises(AudioFileError, match="is a folder"):
        read_audio(tmp_path)


def test_header_only_wav_has_no_audio(tmp_path):
    path = tmp_path / "header.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    assert path.stat().st_size == 44
    with pytest.raises(AudioFileError, match="no audio: the header is there but holds 0 frames") as caught:
        read_audio(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_truncated_wav_says_how_much_is_missing(tmp_path):
    whole = wav_bytes(tmp_path)  # 0.2 s at 16 kHz: 6400 bytes of audio after a 44-byte header
    path = tmp_path / "cut.wav"
    path.write_bytes(whole[:1000])
    with pytest.raises(AudioFileError) as caught:
        read_audio(path)
    assert str(caught.value) == f"{path}: truncated: header says 6400 bytes of audio, file has 956"
    path.write_bytes(whole[:44] + whole[44:] + b"\0\0")  # longer than said: trailing bytes are not a cut
    assert read_audio(path).size == 3200


def test_a_streamed_wav_of_unknown_length_is_read(tmp_path):
    whole = bytearray(wav_bytes(tmp_path))
    assert whole[36:40] == b"data"
    whole[40:44] = b"\xff\xff\xff\xff"  # written before the length was known
    path = tmp_path / "streamed.wav"
    path.write_bytes(bytes(whole))
    assert read_audio(path).size == 3200


@pytest.mark.parametrize("content", [b"this is not audio at all, just some text\n", bytes(range(256)) * 4])
def test_not_audio_is_named(tmp_path, content):
    path = tmp_path / "notes.wav"
    path.write_bytes(content)
    with pytest.raises(AudioFileError) as caught:
        read_audio(path)
    assert str(caught.value).startswith(f"{path}: not audio that libsndfile can read (")
    assert "expected WAV, FLAC, OGG or MP3" in str(caught.value)


def test_a_riff_header_with_no_data_chunk(tmp_path):
    path = tmp_path / "bare.wav"
    path.write_bytes(b"RIFF\x04\x00\x00\x00WAVE")
    with pytest.raises(AudioFileError, match="WAV header without a data chunk"):
        read_audio(path)


def test_int16_extremes_round_to_nearest_and_clip():
    step = 1 / 32768
    floats = np.array([32767 * step, 32766.6 * step, 32767.4 * step, 32767.6 * step, 1.0 + step, -1.0, -1.0 - step])
    assert to_pcm16(floats).tolist() == [32767, 32767, 32767, 32767, 32767, -32768, -32768]
    assert to_pcm16(np.array([0.49 * step, -0.49 * step, 0.51 * step, -0.51 * step])).tolist() == [0, 0, 1, -1]
    assert to_pcm16(np.float32([-np.inf, np.inf])).tolist() == [-32768, 32767]
    assert to_float(np.array([-32768, -1, 0, 1, 32767], np.int16)).tolist() == [-1.0, -step, 0.0, step, 32767 * step]
    assert to_float(np.array([-32768, 32767], np.int16)).dtype == np.float32


def test_bytes_are_little_endian_int16():
    assert to_float(b"\x00\x80\xff\x7f\x01\x00").tolist() == [-1.0, 32767 / 32768, 1 / 32768]
    assert to_float(bytearray(b"\x00\x40")).tolist() == [0.5]


def test_int16_input_is_returned_as_it_is():
    pcm = np.array([-32768, -3, 0, 7, 32767], np.int16)
    assert to_pcm16(pcm) is pcm


def test_24_bit_stereo_at_another_rate_keeps_its_precision_and_mixes_down(tmp_path):
    rate = 22050
    left, right = tone(rate, 1.0, amplitude=0.6), np.zeros(rate, np.float32)
    path = tmp_path / "stereo24.wav"
    soundfile.write(str(path), np.stack([left, right], axis=1), rate, subtype="PCM_24")
    samples, file_rate = read_audio_channels(path)
    assert file_rate == rate and samples.shape == (rate, 2)
    np.testing.assert_allclose(samples[:, 0], left, atol=2**-23)  # finer than int16's step of 2**-15
    for target in (8000, 16000, 24000, 48000):
        audio = read_audio(path, target)
        assert audio.size == pytest.approx(target, abs=1)
        assert dominant_hz(audio, target) == pytest.approx(TONE_HZ, abs=2)
        assert np.abs(audio).max() == pytest.approx(0.3, abs=0.01)  # the mean of the tone and silence


def test_float_stereo_at_another_rate_is_not_clipped_until_it_becomes_int16(tmp_path):
    rate = 48000
    loud = tone(rate, 0.5, amplitude=1.5)  # a float file may hold samples past full scale
    path = tmp_path / "loud.wav"
    soundfile.write(str(path), np.stack([loud, loud], axis=1), rate, subtype="FLOAT")
    audio = read_audio(path, 16000)
    assert np.abs(audio).max() == pytest.approx(1.5, abs=0.02)
    pcm = to_pcm16(audio)
    assert pcm.max() == 32767 and pcm.min() == -32768
    assert dominant_hz(audio, 16000) == pytest.approx(TONE_HZ, abs=3)
