import asyncio
import threading

import numpy as np
import pytest
from pipecat.audio.utils import calculate_audio_volume
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADState

from processors.audio_io import to_pcm16
from processors.vad import SharedSileroVADAnalyzer, WebRTCVADAnalyzer, make_vad_analyzer
from tests.speech import recorded, silence, speech_bounds

# "Can you tell me when the next train to Boston leaves?", a committed espeak-ng recording: the VADs'
# verdicts are asserted on it, and another espeak-ng build would speak it differently.
SENTENCE = "train_question"
CHUNK_SECS = 0.02  # what a transport hands the VAD; the state is only seen at a chunk's end
TRUTH_GRID_SECS = 0.01  # speech_bounds works in 10 ms blocks
LEAD_SECS, TAIL_SECS = 0.5, 1.0

# WebRTC's vad_core.c (kOverHangMax2*): after a long run of speech, frames webrtcvad still calls speech
# once the speech has ended, per mode and frame length. QUIET comes that much after stop_secs.
WEBRTC_HANGOVER_FRAMES = {
    mode: {10: 14, 20: 7, 30: 5} if mode < 2 else {10: 9, 20: 5, 30: 3} for mode in range(4)
}


def run_vad(analyzer: VADAnalyzer, samples: np.ndarray, rate: int) -> list[VADState]:
    """The state after each 20 ms chunk, fed through pipecat's analyze_audio state machine."""

    async def feed() -> list[VADState]:
        analyzer.set_sample_rate(rate)
        chunk = round(rate * CHUNK_SECS)
        return [
            await analyzer.analyze_audio(samples[i : i + chunk].tobytes())
            for i in range(0, len(samples), chunk)
        ]

    return asyncio.run(feed())


def speech_segments(states: list[VADState]) -> list[tuple[float, float | None]]:
    """(time SPEAKING began, time QUIET came back) for each segment, in seconds of audio."""
    segments, began, previous = [], None, VADState.QUIET
    for i, state in enumerate(states):
        now = (i + 1) * CHUNK_SECS
        if state == VADState.SPEAKING and began is None:
            began = now
        if state == VADState.QUIET and previous != VADState.QUIET and began is not None:
            segments.append((began, now))
            began = None
        previous = state
    if began is not None:
        segments.append((began, None))
    return segments


def utterance(rate: int) -> tuple[np.ndarray, float, float]:
    """Silence, the sentence, silence; and where the speech truly starts and ends, from its energy."""
    speech = recorded(SENTENCE, rate)
    start, end = speech_bounds(speech, rate)
    samples = np.concatenate([silence(LEAD_SECS, rate), speech, silence(TAIL_SECS, rate)])
    return samples, LEAD_SECS + start, LEAD_SECS + end


def tone(rate: int, seconds: float, *freqs: float, dbfs: float = -20.0) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    amplitude = 10 ** (dbfs / 20) / len(freqs)
    return to_pcm16(sum(amplitude * np.sin(2 * np.pi * f * t + i) for i, f in enumerate(freqs)))


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
@pytest.mark.parametrize("aggressiveness", [0, 1, 2, 3])
@pytest.mark.parametrize("rate", [8000, 16000])
def test_webrtc_finds_speech_within_one_window_of_the_truth(rate, aggressiveness, frame_ms):
    samples, true_start, true_end = utterance(rate)
    analyzer = make_vad_analyzer("webrtc", aggressiveness=aggressiveness, frame_ms=frame_ms)
    segments = speech_segments(run_vad(analyzer, samples, rate))
    assert len(segments) == 1, segments
    start, end = segments[0]

    frame = frame_ms / 1000
    window = round(0.2 / frame) * frame  # start_secs and stop_secs in whole frames, as pipecat counts them
    slack = frame + CHUNK_SECS + TRUTH_GRID_SECS + 1e-9
    # Never before start_secs of speech (a frame may straddle the onset); at most a frame and a chunk late.
    assert true_start + window - frame <= start <= true_start + window + slack
    # Never before stop_secs of silence; late by webrtcvad's hangover, plus a frame for its own lag.
    hangover = WEBRTC_HANGOVER_FRAMES[aggressiveness][frame_ms] * frame
    assert true_end + window - frame <= end <= true_end + window + hangover + frame + slack


@pytest.mark.parametrize("rate", [8000, 16000])
def test_silero_is_selectable_and_finds_the_same_speech(rate):
    samples, true_start, true_end = utterance(rate)
    analyzer = make_vad_analyzer("silero")
    assert isinstance(analyzer, SileroVADAnalyzer)
    segments = speech_segments(run_vad(analyzer, samples, rate))
    assert len(segments) == 1, segments
    start, end = segments[0]
    window = 0.032  # Silero scores 512 samples at 16 kHz, 256 at 8 kHz
    starts_after, stops_after = round(0.2 / window) * window, round(0.2 / window) * window
    # Silero's confidence trails the onset by up to a window more than webrtcvad's.
    assert true_start + starts_after - window <= start <= true_start + starts_after + 2 * window + CHUNK_SECS
    assert true_end + stops_after - window <= end <= true_end + stops_after + 2 * window + CHUNK_SECS


NON_SPEECH = {
    "silence": lambda rate: silence(3.0, rate),
    "white noise at -45 dBFS": lambda rate: to_pcm16(np.random.default_rng(5).standard_normal(3 * rate) * 10 ** (-45 / 20)),
    "1 kHz tone": lambda rate: tone(rate, 3.0, 1000),
    "DTMF 1 (697 + 1209 Hz)": lambda rate: tone(rate, 3.0, 697, 1209),
    "DTMF 9 (852 + 1477 Hz)": lambda rate: tone(rate, 3.0, 852, 1477),
    "ringback (440 + 480 Hz)": lambda rate: tone(rate, 3.0, 440, 480),
}


@pytest.mark.parametrize("kind", ["webrtc", "silero"])
@pytest.mark.parametrize("rate", [8000, 16000])
@pytest.mark.parametrize("signal", list(NON_SPEECH))
def test_non_speech_makes_no_speech_segment_by_default(signal, rate, kind):
    samples = NON_SPEECH[signal](rate)
    assert speech_segments(run_vad(make_vad_analyzer(kind), samples, rate)) == []


@pytest.mark.parametrize("aggressiveness", [0, 1, 2, 3])
def test_webrtcvad_alone_calls_steady_tones_speech_at_every_aggressiveness(aggressiveness):
    # Why WebRTCVADAnalyzer rejects tones: without that, a DTMF key or a beep is a speech segment (and a
    # barge-in) whatever the aggressiveness. If webrtcvad ever stops doing this, the rejection can go.
    for freqs in [(1000,), (697, 1209), (852, 1477)]:
        analyzer = WebRTCVADAnalyzer(aggressiveness=aggressiveness, reject_tones=False)
        assert len(speech_segments(run_vad(analyzer, tone(8000, 2.0, *freqs), 8000))) == 1


def test_tone_rejection_still_hears_speech_after_a_key_press_and_over_a_tone():
    rate = 8000
    speech = recorded(SENTENCE, rate)
    start, end = speech_bounds(speech, rate)
    key_press = tone(rate, 1.0, 697, 1209)
    samples = np.concatenate([silence(0.3, rate), key_press, silence(0.3, rate), speech, silence(1.0, rate)])
    segments = speech_segments(run_vad(make_vad_analyzer("webrtc"), samples, rate))
    assert len(segments) == 1
    assert 1.6 + start < segments[0][0] < 1.6 + start + 0.3  # the key press is not speech; the sentence is

    hum = tone(rate, len(speech) / rate, 1000, dbfs=-40)
    over_hum = np.concatenate([silence(0.5, rate), speech + hum, silence(1.0, rate)])
    segments = speech_segments(run_vad(make_vad_analyzer("webrtc"), over_hum, rate))
    assert len(segments) == 1
    assert 0.5 + start < segments[0][0] < 0.5 + start + 0.3
    assert 0.5 + end < segments[0][1] < 0.5 + end + 0.6


def test_speech_below_min_volume_is_not_speech():
    # Speech at -55 dBFS RMS: webrtcvad still calls most of it speech; its volume reads ~0.55.
    rate = 8000
    speech = recorded(SENTENCE, rate).astype(np.float64)
    rms_dbfs = 20 * np.log10(np.sqrt(np.mean(speech**2)) / 32768)
    faint = np.round(speech * 10 ** ((-55 - rms_dbfs) / 20)).astype(np.int16)
    samples = np.concatenate([silence(0.5, rate), faint, silence(1.0, rate)])
    assert speech_segments(run_vad(make_vad_analyzer("webrtc"), samples, rate)) == []  # min_volume 0.6
    assert len(speech_segments(run_vad(make_vad_analyzer("webrtc", min_volume=0.4), samples, rate))) >= 1


def volume_after(analyzer: WebRTCVADAnalyzer, samples: np.ndarray) -> float:
    frame = analyzer.num_frames_required()
    for i in range(0, samples.size - frame + 1, frame):
        volume = analyzer._get_smoothed_volume(samples[i : i + frame].tobytes())
    return volume


def test_volume_reads_on_pipecats_scale():
    analyzer = WebRTCVADAnalyzer(sample_rate=16000)
    analyzer.set_sample_rate(16000)
    # A 1 kHz sine reads its RMS on BS.1770's scale: peak -20 dBFS is RMS -23 dB, i.e. (-23 + 110) / 100.
    sine = tone(16000, 0.4, 1000, dbfs=-20.0)
    assert volume_after(analyzer, sine) == pytest.approx(0.87, abs=0.005)
    assert volume_after(analyzer, sine) == pytest.approx(
        calculate_audio_volume(sine.tobytes(), 16000), abs=0.005
    )
    assert analyzer._get_smoothed_volume(bytes(640)) > 0  # the window still holds the sine
    for _ in range(20):
        volume = analyzer._get_smoothed_volume(bytes(640))
    assert volume == 0.0  # below the -70 dB gate once the window is all silence


@pytest.mark.parametrize("rate", [8000, 16000])
def test_volume_on_speech_is_within_a_decibel_of_pipecats_meter(rate):
    speech = recorded(SENTENCE, rate)
    window = round(0.4 * rate)
    for gain_db in (0, -20, -40):
        scaled = np.round(speech * 10 ** (gain_db / 20)).astype(np.int16)
        for end in range(window, scaled.size, window // 2):
            analyzer = WebRTCVADAnalyzer(sample_rate=rate)
            analyzer.set_sample_rate(rate)
            ours = volume_after(analyzer, scaled[end - window : end])
            theirs = calculate_audio_volume(scaled[end - window : end].tobytes(), rate)
            if theirs > 0:  # both gate at -70 dB; pipecat's relative gate can drop a block ours keeps
                assert ours == pytest.approx(theirs, abs=0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_rate": 48000}, r"48000.*\(8000, 16000\)"),
        ({"aggressiveness": 4}, r"aggressiveness 4.*0, 1, 2 or 3"),
        ({"frame_ms": 25}, r"25 ms.*\(10, 20, 30\)"),
    ],
)
def test_webrtc_bad_options_name_the_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_vad_analyzer("webrtc", **kwargs)


def test_webrtc_analyzes_on_the_callers_thread():
    # No per-frame hand-off to a worker thread: the hop costs more than webrtcvad's work.
    threads = []

    class Recording(WebRTCVADAnalyzer):
        def voice_confidence(self, buffer: bytes) -> float:
            threads.append(threading.get_ident())
            return super().voice_confidence(buffer)

    run_vad(Recording(), tone(8000, 0.2, 440), 8000)
    assert len(threads) == 10 and set(threads) == {threading.get_ident()}


def test_webrtc_rejects_a_transport_rate_it_cannot_analyze():
    with pytest.raises(ValueError, match=r"24000.*\(8000, 16000\)"):
        WebRTCVADAnalyzer().set_sample_rate(24000)


def test_unknown_kind_names_it_and_the_kinds():
    with pytest.raises(ValueError, match=r"'cobra'.*\('webrtc', 'silero'\)"):
        make_vad_analyzer("cobra")


def test_silero_analyzers_share_one_session_and_keep_their_own_state():
    rate = 16000
    samples, _, _ = utterance(rate)
    first, second = make_vad_analyzer("silero"), make_vad_analyzer("silero")
    assert isinstance(first, SharedSileroVADAnalyzer)
    assert first._model.session is second._model.session

    # Interleaved streams (speech on one, silence on the other) score as they would alone, and as
    # pipecat's own analyzer (with its own session) scores them.
    pipecat_own = SileroVADAnalyzer(sample_rate=rate)
    for analyzer in (first, second, pipecat_own):
        analyzer.set_sample_rate(rate)
    window = 512
    quiet = silence(len(samples) / rate, rate)
    for i in range(0, len(samples) - window + 1, window):
        speech_score = first.voice_confidence(samples[i : i + window].tobytes())
        silence_score = second.voice_confidence(quiet[i : i + window].tobytes())
        assert speech_score == pytest.approx(pipecat_own.voice_confidence(samples[i : i + window].tobytes()))
        assert silence_score < 0.1
