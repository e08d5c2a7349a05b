import asyncio
import itertools
import warnings

import numpy as np
import pytest
import soxr
from pipecat.audio.resamplers.base_audio_resampler import BaseAudioResampler

from processors.audio import (
    DEFAULT_QUALITY,
    SUPPORTED_RATES,
    PipecatStreamResampler,
    StreamResampler,
    alaw_decode,
    alaw_encode,
    ulaw_decode,
    ulaw_encode,
)

ALL_PCM = np.arange(-32768, 32768).astype(np.int16)
ALL_CODES = bytes(range(256))
RATE_PAIRS = [(a, b) for a, b in itertools.permutations(SUPPORTED_RATES, 2)]


def sweep(rate: int, seconds: float, amplitude: float, f0: float = 100.0, f1: float = 3400.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    return np.round(amplitude * 32767 * np.sin(phase)).astype(np.int16)


def snr_db(reference: np.ndarray, decoded: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    error = decoded.astype(np.float64) - reference
    return 10 * np.log10(np.sum(reference**2) / np.sum(error**2))


def level_db(samples: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(samples.astype(np.float64) ** 2)) / 32768)


def one_shot_resample(samples: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """The whole signal through soxr at once: the reference a stream must match."""
    out = soxr.resample(samples.astype(np.float32) / 32768, in_rate, out_rate, quality=DEFAULT_QUALITY)
    return np.clip(np.rint(out * 32768), -32768, 32767).astype(np.int16)


def stream_in_chunks(resampler: StreamResampler, samples: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while i < len(samples):
        n = int(rng.integers(1, 1200))
        out.append(resampler.process(samples[i : i + n].tobytes()))
        i += n
    out.append(resampler.flush())
    return np.frombuffer(b"".join(out), dtype=np.int16)


def test_g711_known_values_from_the_standard():
    # µ-law: zero is 0xFF (0x7F is "negative zero"); full scale is ±8031 in 14 bits, ±32124 in 16.
    assert ulaw_encode(np.array([0, -1, 32767, -32768], dtype=np.int16)) == b"\xff\x7f\x80\x00"
    assert ulaw_decode(b"\xff\x7f\x80\x00").tolist() == [0, 0, 32124, -32124]
    # A-law: zero is 0xD5 and -1 is 0x55 (even bits inverted); full scale is ±4032 in 13 bits, ±32256 in 16.
    assert alaw_encode(np.array([0, -1, 32767, -32768], dtype=np.int16)) == b"\xd5\x55\xaa\x2a"
    assert alaw_decode(b"\xd5\x55\xaa\x2a").tolist() == [8, -8, 32256, -32256]


@pytest.mark.parametrize("codec", ["ulaw", "alaw"])
def test_g711_every_code_round_trips(codec):
    encode, decode = (ulaw_encode, ulaw_decode) if codec == "ulaw" else (alaw_encode, alaw_decode)
    levels = decode(ALL_CODES)
    assert np.array_equal(decode(encode(levels)), levels)
    back = np.frombuffer(encode(levels), dtype=np.uint8)
    codes = np.arange(256)
    # Only µ-law's negative zero (0x7F) decodes to a level another code (0xFF) also has.
    changed = codes[back != codes].tolist()
    assert changed == ([0x7F] if codec == "ulaw" else [])


# Segment boundaries as G.711 tabulates its decision values: µ-law on 14-bit magnitudes, A-law on 13-bit.
ULAW_SEGMENT_STARTS = [31, 95, 223, 479, 991, 2015, 4063]
ALAW_SEGMENT_STARTS = [32, 64, 128, 256, 512, 1024, 2048]


def test_ulaw_error_is_at_most_half_an_interval_of_the_segment():
    # Segment e's intervals are 2**(e+1) wide in 14 bits (2**(e+3) in 16); the level sits mid-interval.
    x = ALL_PCM.astype(np.int64)
    decoded = ulaw_decode(ulaw_encode(ALL_PCM)).astype(np.int64)
    clipped = np.abs(x) > 32635
    assert np.all(decoded[clipped] == np.sign(x[clipped]) * 32124)
    segment = np.searchsorted(ULAW_SEGMENT_STARTS, np.abs(x) >> 2, side="right")
    assert np.all((np.abs(decoded - x) <= 2 ** (segment + 2))[~clipped])


def test_alaw_error_is_at_most_half_an_interval_of_the_segment():
    # Intervals are 2 wide (13 bits) in segments 0 and 1 and 2**s in segment s after; 16-bit units are 8x.
    x = ALL_PCM.astype(np.int64)
    decoded = alaw_decode(alaw_encode(ALL_PCM)).astype(np.int64)
    magnitude_13 = np.where(x >= 0, x >> 3, ~(x >> 3))  # negative values are one's complemented
    segment = np.searchsorted(ALAW_SEGMENT_STARTS, magnitude_13, side="right")
    interval = 8 * np.where(segment < 2, 2, 2**segment)
    assert np.all(np.abs(decoded - x) <= interval // 2)


def test_ulaw_codes_sign_and_magnitude_apart():
    # -x differs from x only in the sign bit.
    positive = ALL_PCM[ALL_PCM > 0]
    pos_codes = np.frombuffer(ulaw_encode(positive), dtype=np.uint8)
    neg_codes = np.frombuffer(ulaw_encode(-positive), dtype=np.uint8)
    assert np.array_equal(neg_codes, pos_codes ^ 0x80)


def test_g711_agrees_with_audioop_where_python_still_has_it():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    assert np.array_equal(ulaw_decode(ALL_CODES), np.frombuffer(audioop.ulaw2lin(ALL_CODES, 2), "<i2"))
    assert np.array_equal(alaw_decode(ALL_CODES), np.frombuffer(audioop.alaw2lin(ALL_CODES, 2), "<i2"))
    assert alaw_encode(ALL_PCM) == audioop.lin2alaw(ALL_PCM.tobytes(), 2)
    # audioop truncates negative µ-law input in two's complement (381 values differ by one level near
    # decision points); G.711 is sign-magnitude, so compare the non-negative half exactly.
    non_negative = ALL_PCM[ALL_PCM >= 0]
    assert ulaw_encode(non_negative) == audioop.lin2ulaw(non_negative.tobytes(), 2)


@pytest.mark.parametrize("codec", ["ulaw", "alaw"])
def test_g711_round_trip_snr_on_a_sine_sweep(codec):
    encode, decode = (ulaw_encode, ulaw_decode) if codec == "ulaw" else (alaw_encode, alaw_decode)
    snr = {}
    for level_dbfs in (-10, -20, -30, -40):
        signal = sweep(8000, 2.0, 10 ** (level_dbfs / 20))
        snr[level_dbfs] = snr_db(signal, decode(encode(signal)))
    assert snr[-10] > 35 and snr[-20] > 35
    # Companding keeps SNR nearly level as the signal falls (8-bit linear PCM would be near 10 dB at -40).
    assert min(snr.values()) > 33
    signal = sweep(8000, 0.5, 0.3)
    assert np.array_equal(decode(encode(signal.tobytes())), decode(encode(signal)))


@pytest.mark.parametrize(("in_rate", "out_rate"), RATE_PAIRS)
def test_streaming_in_random_chunks_equals_one_shot(in_rate, out_rate):
    rng = np.random.default_rng(in_rate + out_rate)
    t = np.arange(in_rate) / in_rate
    signal = 6000 * np.sin(2 * np.pi * 440 * t) + 1500 * rng.standard_normal(t.size)
    signal = signal.astype(np.int16)
    streamed = stream_in_chunks(StreamResampler(in_rate, out_rate), signal, seed=in_rate * out_rate)
    one_shot = one_shot_resample(signal, in_rate, out_rate)

    # soxr's streaming mode trims its filter's start-up delay itself: the delay shows up as audio held back
    # until flush(), not as an offset. Find the alignment rather than assume it.
    lags = range(-64, 65)
    core = one_shot[200:-200].astype(np.float64)
    scores = [np.dot(streamed[200 + lag : 200 + lag + core.size].astype(np.float64), core) for lag in lags]
    assert lags[int(np.argmax(scores))] == 0
    assert len(streamed) == len(one_shot)
    assert np.max(np.abs(streamed.astype(np.int32) - one_shot)) <= 1


@pytest.mark.parametrize(("in_rate", "out_rate"), RATE_PAIRS)
def test_streaming_holds_back_a_bounded_amount_of_audio(in_rate, out_rate):
    # What the stream withholds is latency on the call; measured at most ~118 ms (8k <-> 16k) with MQ.
    resampler = StreamResampler(in_rate, out_rate)
    chunk = np.zeros(in_rate // 50, dtype=np.int16)
    held_ms = []
    produced = 0
    for n in range(1, 151):
        produced += len(resampler.process(chunk)) // 2
        held_ms.append((n * len(chunk) * out_rate / in_rate - produced) / out_rate * 1000)
    assert max(held_ms) < 125
    assert (len(resampler.flush()) // 2 + produced) == 150 * len(chunk) * out_rate // in_rate


@pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 16000), (24000, 8000)])
def test_chunk_edges_add_no_discontinuity(in_rate, out_rate):
    t = np.arange(in_rate * 2) / in_rate
    sine = np.round(12000 * np.sin(2 * np.pi * 150 * t)).astype(np.int16)
    edge = out_rate // 10  # both ends of the whole signal have their own filter transients

    def steps(y: np.ndarray) -> tuple[int, int]:
        y = y.astype(np.int64)
        return np.abs(np.diff(y))[edge:-edge].max(), np.abs(np.diff(y, 2))[edge:-edge].max()

    one_shot_step, one_shot_bend = steps(one_shot_resample(sine, in_rate, out_rate))
    step, bend = steps(stream_in_chunks(StreamResampler(in_rate, out_rate), sine, seed=3))
    assert step <= one_shot_step + 2
    assert bend <= one_shot_bend + 4

    # The check sees a chunk edge: resampling each 20 ms on its own (no carried state) fails it.
    chunk = in_rate // 50
    pieces = [one_shot_resample(sine[i : i + chunk], in_rate, out_rate) for i in range(0, len(sine), chunk)]
    assert steps(np.concatenate(pieces))[1] > one_shot_bend + 4


def test_a_tone_keeps_its_frequency_and_level_through_8k_48k_8k():
    t = np.arange(8000 * 2) / 8000
    tone = np.round(10000 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)
    up = stream_in_chunks(StreamResampler(8000, 48000), tone, seed=1)
    down = stream_in_chunks(StreamResampler(48000, 8000), up, seed=2)

    for samples, rate in ((up, 48000), (down, 8000)):
        middle = samples[rate // 4 : -rate // 4]
        assert abs(level_db(middle) - level_db(tone)) < 0.1
        spectrum = np.abs(np.fft.rfft(middle * np.hanning(middle.size)))
        freqs = np.fft.rfftfreq(middle.size, 1 / rate)
        assert abs(freqs[np.argmax(spectrum)] - 1000) < 5
    # Upsampling must not leave images of the tone around multiples of 8 kHz (7, 9, 15, 17 kHz ...).
    middle = up[12000:-12000]
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(middle.size)))
    freqs = np.fft.rfftfreq(middle.size, 1 / 48000)
    images = spectrum[(freqs > 4500) & (freqs < 24000)].max()
    assert 20 * np.log10(images / spectrum.max()) < -60


def test_equal_rates_pass_through_and_int16_arrays_are_accepted():
    samples = sweep(16000, 0.1, 0.3)
    same = StreamResampler(16000, 16000)
    assert same.process(samples) == samples.tobytes()
    assert same.process(samples.tobytes()) == samples.tobytes()
    assert same.flush() == b""

    from_array, from_bytes = StreamResampler(16000, 8000), StreamResampler(16000, 8000)
    assert (
        from_array.process(samples) + from_array.flush()
        == from_bytes.process(samples.tobytes()) + from_bytes.flush()
    )


@pytest.mark.parametrize(
    ("in_rate", "out_rate", "bad"), [(44100, 16000, 44100), (8000, 22050, 22050), (0, 8000, 0)]
)
def test_unsupported_rate_raises_naming_it_and_the_supported_ones(in_rate, out_rate, bad):
    with pytest.raises(ValueError, match=rf"{bad}.*\(8000, 16000, 24000, 48000\)"):
        StreamResampler(in_rate, out_rate)


def test_bad_pcm_is_refused_with_what_was_expected():
    with pytest.raises(ValueError, match="even number of bytes, got 3"):
        StreamResampler(8000, 16000).process(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="int16"):
        ulaw_encode(np.zeros(4, dtype=np.float32))


def test_flush_then_reuse_starts_a_clean_stream():
    def pcm(data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.int16).astype(np.int32)

    resampler = StreamResampler(24000, 8000)
    speech = sweep(24000, 0.5, 0.5)
    first = pcm(resampler.process(speech) + resampler.flush())
    second = pcm(resampler.process(speech) + resampler.flush())
    assert len(first) == 4000 and np.array_equal(first, second)

    resampler.process(speech)
    resampler.reset()  # abandoned: what the filter held must not leak into the next stream
    third = pcm(resampler.process(speech) + resampler.flush())
    assert np.array_equal(third, first)


def test_pipecat_resampler_keeps_one_stream_per_rate_pair():
    assert issubclass(PipecatStreamResampler, BaseAudioResampler)
    speech_24k, prompt_16k = sweep(24000, 0.6, 0.4), sweep(16000, 0.6, 0.4, f0=300)

    async def interleaved() -> tuple[bytes, bytes, bytes]:
        resampler = PipecatStreamResampler()
        out_24k, out_16k = b"", b""
        for i in range(0, 30):
            out_24k += await resampler.resample(speech_24k[i * 480 : (i + 1) * 480].tobytes(), 24000, 8000)
            out_16k += await resampler.resample(prompt_16k[i * 320 : (i + 1) * 320].tobytes(), 16000, 8000)
        assert await resampler.resample(b"\x01\x00", 8000, 8000) == b"\x01\x00"
        tails = await resampler.flush()
        return out_24k, out_16k, tails

    out_24k, out_16k, tails = asyncio.run(interleaved())
    alone_24k, alone_16k = StreamResampler(24000, 8000), StreamResampler(16000, 8000)
    expected_24k = b"".join(alone_24k.process(speech_24k[i * 480 : (i + 1) * 480]) for i in range(30))
    expected_16k = b"".join(alone_16k.process(prompt_16k[i * 320 : (i + 1) * 320]) for i in range(30))
    assert out_24k == expected_24k and out_16k == expected_16k
    assert tails == alone_24k.flush() + alone_16k.flush()
