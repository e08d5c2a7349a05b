"""Voice activity analyzers for pipecat: webrtcvad (the phone default) and Silero on one shared model."""

import math
import threading
from collections import deque
from importlib import resources

import numpy as np
import onnxruntime
import webrtcvad
from pipecat.audio.vad.silero import SileroOnnxModel, SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams, VADState

from processors.audio_io import to_float

VAD_KINDS = ("webrtc", "silero")
VAD_SAMPLE_RATES = (8000, 16000)
WEBRTC_FRAME_MS = (10, 20, 30)

# min_volume keeps pipecat's meaning: loudness of the last 400 ms (one BS.1770 gating block) on a
# -110..-10 dB scale, 0 below the -70 dB absolute gate. Measured here as plain RMS, within 0.7 dB of
# pipecat's K-weighted reading on speech, at a fraction of the cost of its meter (which was ~85% of
# the analyzer's time), and without pipecat's extra exponential smoothing, which added ~110 ms to
# Silero's speech onset (measured).
_VOLUME_WINDOW_SECS = 0.4
_VOLUME_FLOOR_DB, _VOLUME_CEILING_DB, _VOLUME_GATE_DB = -110.0, -10.0, -70.0

# webrtcvad calls steady tones speech at every aggressiveness (DTMF keys, ringback, a 1 kHz beep), which
# would barge in on the agent. A tone puts nearly all of a 40 ms spectrum's energy in its two strongest
# peaks and holds them still. Measured: espeak-ng speech at 8/16 kHz <= 0.95 of the energy, single and
# DTMF tones with noise at -40 dBFS >= 0.97.
_TONE_WINDOW_SECS = 0.04
_TONE_PEAK_SHARE = 0.96
_TONE_PEAK_HALF_WIDTH = 2  # bins either side of a peak: a Hann window's main lobe


def _check_sample_rate(sample_rate: int, analyzer: str) -> None:
    if sample_rate not in VAD_SAMPLE_RATES:
        raise ValueError(
            f"{analyzer} sample rate {sample_rate!r} Hz not supported; expected one of {VAD_SAMPLE_RATES}"
        )


class _WindowedVolume:
    """Replaces VADAnalyzer's volume meter (``_get_smoothed_volume``, called once per analysis frame)."""

    _frame_energies: deque

    def _reset_volume(self, frame_secs: float) -> None:
        self._frame_energies = deque(maxlen=max(1, round(_VOLUME_WINDOW_SECS / frame_secs)))

    def _get_smoothed_volume(self, audio: bytes) -> float:
        samples = to_float(audio)
        self._frame_energies.append(float(np.dot(samples, samples)) / samples.size)
        mean_energy = sum(self._frame_energies) / len(self._frame_energies)
        level_db = 10 * math.log10(mean_energy) if mean_energy > 0 else -math.inf
        if level_db < _VOLUME_GATE_DB:
            return 0.0
        return min(1.0, (level_db - _VOLUME_FLOOR_DB) / (_VOLUME_CEILING_DB - _VOLUME_FLOOR_DB))


class WebRTCVADAnalyzer(_WindowedVolume, VADAnalyzer):
    """pipecat VADAnalyzer over webrtcvad: confidence 1.0 for a speech frame, 0.0 otherwise.

    Runs inline on the caller's thread: a frame costs microseconds, less than the hand-off to pipecat's
    per-analyzer worker thread. With ``reject_tones`` a steady one- or two-tone frame is not speech.
    """

    def __init__(
        self,
        *,
        sample_rate: int | None = None,
        params: VADParams | None = None,
        aggressiveness: int = 2,
        frame_ms: int = 20,
        reject_tones: bool = True,
    ):
        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError(
                f"webrtcvad aggressiveness {aggressiveness!r} not supported; expected 0, 1, 2 or 3"
            )
        if frame_ms not in WEBRTC_FRAME_MS:
            raise ValueError(
                f"webrtcvad frame of {frame_ms!r} ms not supported; expected one of {WEBRTC_FRAME_MS}"
            )
        if sample_rate is not None:
            _check_sample_rate(sample_rate, "webrtcvad")
        super().__init__(sample_rate=sample_rate, params=params)
        self._vad = webrtcvad.Vad(aggressiveness)
        self._frame_ms = frame_ms
        self._reject_tones = reject_tones
        self._reset_volume(frame_ms / 1000)
        self._recent: deque[bytes] = deque(maxlen=math.ceil(_TONE_WINDOW_SECS * 1000 / frame_ms))
        self._tone_taper = np.zeros(0, dtype=np.float32)
        self._last_tone_peaks: tuple[int, ...] = ()

    def set_sample_rate(self, sample_rate: int):
        _check_sample_rate(self._init_sample_rate or sample_rate, "webrtcvad")
        super().set_sample_rate(sample_rate)
        self._reset_volume(self._frame_ms / 1000)
        self._recent.clear()
        self._tone_taper = np.hanning(round(self.sample_rate * _TONE_WINDOW_SECS)).astype(np.float32)

    def num_frames_required(self) -> int:
        return self.sample_rate * self._frame_ms // 1000

    def voice_confidence(self, buffer: bytes) -> float:
        self._recent.append(buffer)
        if not self._vad.is_speech(buffer, self.sample_rate):
            return 0.0
        return 0.0 if self._reject_tones and self._is_steady_tone() else 1.0

    async def analyze_audio(self, buffer: bytes) -> VADState:
        return self._run_analyzer(buffer)

    def _is_steady_tone(self) -> bool:
        """Whether the last 40 ms is one or two steady tones: nearly all energy in two peaks that stay put."""
        recent = np.frombuffer(b"".join(self._recent), dtype=np.int16)[-self._tone_taper.size :]
        if recent.size < self._tone_taper.size:
            return False
        spectrum = np.fft.rfft(recent * self._tone_taper)
        power = spectrum.real**2 + spectrum.imag**2
        total = float(power.sum())
        peaks = []
        for _ in range(2):
            peak = int(np.argmax(power))
            lobe = slice(max(0, peak - _TONE_PEAK_HALF_WIDTH), peak + _TONE_PEAK_HALF_WIDTH + 1)
            peaks.append((peak, float(power[lobe].sum())))
            power[lobe] = 0.0
        # Of two near-equal tones either can be the stronger in a given window, so compare with both.
        steady = any(abs(peaks[0][0] - earlier) <= 1 for earlier in self._last_tone_peaks)
        self._last_tone_peaks = (peaks[0][0], peaks[1][0])
        return steady and peaks[0][1] + peaks[1][1] >= _TONE_PEAK_SHARE * total


# Silero: one ONNX session per process, recurrent state per stream. onnxruntime allows concurrent run()
# calls on one session; pipecat's own analyzer loads a session (+11 MB) for every call.

_silero_session: onnxruntime.InferenceSession | None = None
_silero_lock = threading.Lock()


def shared_silero_session() -> onnxruntime.InferenceSession:
    """The process's Silero VAD session (the model bundled with pipecat), loaded on first use."""
    global _silero_session
    with _silero_lock:
        if _silero_session is None:
            options = onnxruntime.SessionOptions()
            options.inter_op_num_threads = 1
            options.intra_op_num_threads = 1
            model_path = resources.files("pipecat.audio.vad.data").joinpath("silero_vad.onnx")
            _silero_session = onnxruntime.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        return _silero_session


class _SileroStreamState(SileroOnnxModel):
    """pipecat's Silero wrapper (per-stream state, context, input checks) over the shared session."""

    def __init__(self, session: onnxruntime.InferenceSession):
        # Not calling super().__init__(): it would load a session of its own.
        self.session = session
        self.sample_rates = list(VAD_SAMPLE_RATES)
        self.reset_states()


class SharedSileroVADAnalyzer(_WindowedVolume, SileroVADAnalyzer):
    """pipecat's SileroVADAnalyzer (model state resets included) on the process-wide session."""

    def __init__(self, *, sample_rate: int | None = None, params: VADParams | None = None):
        if sample_rate is not None:
            _check_sample_rate(sample_rate, "Silero VAD")
        # SileroVADAnalyzer.__init__ loads a model of its own; set up what it would, on the shared session.
        VADAnalyzer.__init__(self, sample_rate=sample_rate, params=params)
        self._model = _SileroStreamState(shared_silero_session())
        self._windows_since_reset = 0
        self._low_confidence_windows = 0
        self._reset_volume(0.032)

    def set_sample_rate(self, sample_rate: int):
        super().set_sample_rate(sample_rate)
        self._reset_volume(self.num_frames_required() / self.sample_rate)


def make_vad_analyzer(
    kind: str,
    *,
    sample_rate: int | None = None,
    aggressiveness: int = 2,
    frame_ms: int = 20,
    confidence: float = 0.7,
    start_secs: float = 0.2,
    stop_secs: float = 0.2,
    min_volume: float = 0.6,
) -> VADAnalyzer:
    """A VAD analyzer by name; ``aggressiveness`` and ``frame_ms`` are for webrtc (Silero uses 32 ms)."""
    params = VADParams(
        confidence=confidence, start_secs=start_secs, stop_secs=stop_secs, min_volume=min_volume
    )
    if kind == "webrtc":
        return WebRTCVADAnalyzer(
            sample_rate=sample_rate, params=params, aggressiveness=aggressiveness, frame_ms=frame_ms
        )
    if kind == "silero":
        return SharedSileroVADAnalyzer(sample_rate=sample_rate, params=params)
    raise ValueError(f"unknown VAD kind {kind!r}; expected one of {VAD_KINDS}")
