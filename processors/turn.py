"""End of the caller's turn, for pipecat's turn machinery: Smart Turn v3.2 on one shared model, or silence."""

import threading
from importlib import resources

import onnxruntime
from pipecat.audio.turn.smart_turn.base_smart_turn import BaseSmartTurn, SmartTurnParams
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.frames.frames import Frame, VADUserStoppedSpeakingFrame
from pipecat.turns.types import ProcessFrameResult
from pipecat.turns.user_start import VADUserTurnStartStrategy
from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy, TurnAnalyzerUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies
from pipecat.utils.env import env_truthy

TURN_DETECTORS = ("smart_turn", "silence")

_smart_turn_session: onnxruntime.InferenceSession | None = None
_smart_turn_lock = threading.Lock()


def shared_smart_turn_session() -> onnxruntime.InferenceSession:
    """The process's Smart Turn v3.2 session (the CPU model bundled with pipecat), loaded on first use.

    pipecat loads one per call (+56 MB each); onnxruntime allows concurrent run() calls on one session.
    """
    global _smart_turn_session
    with _smart_turn_lock:
        if _smart_turn_session is None:
            options = onnxruntime.SessionOptions()
            options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
            options.inter_op_num_threads = 1
            options.intra_op_num_threads = 1  # calls run side by side; one thread each
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            model_path = resources.files("pipecat.audio.turn.smart_turn.data").joinpath(
                "smart-turn-v3.2-cpu.onnx"
            )
            _smart_turn_session = onnxruntime.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        return _smart_turn_session


class SharedSmartTurnAnalyzer(LocalSmartTurnAnalyzerV3):
    """pipecat's Smart Turn v3 analyzer on the process-wide session; audio buffer and state stay per call."""

    def __init__(self, *, sample_rate: int | None = None, params: SmartTurnParams | None = None):
        # LocalSmartTurnAnalyzerV3.__init__ loads a session of its own; set up what it would, sharing ours.
        BaseSmartTurn.__init__(self, sample_rate=sample_rate, params=params)
        self._log_data = env_truthy("PIPECAT_SMART_TURN_LOG_DATA", default=False)
        self._session = shared_smart_turn_session()


class SilenceUserTurnStopStrategy(SpeechTimeoutUserTurnStopStrategy):
    """Ends the turn once the caller has been silent ``silence_secs``, counted from the end of speech.

    VAD reports a stop ``stop_secs`` after speech ends, so only the rest is waited here. No transcript
    is awaited: the speech-to-speech model takes the audio itself.
    """

    def __init__(self, *, silence_secs: float):
        super().__init__(user_speech_timeout=silence_secs, wait_for_transcript=False)
        self._silence_secs = silence_secs

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        if isinstance(frame, VADUserStoppedSpeakingFrame):
            # The parent arms its timer from this attribute when it handles the frame.
            self._user_speech_timeout = max(0.0, self._silence_secs - frame.stop_secs)
        return await super().process_frame(frame)


def user_turn_strategies(
    detector: str = "smart_turn",
    *,
    silence_secs: float = 0.8,
    max_silence_secs: float = 3.0,
    enable_interruptions: bool = True,
) -> UserTurnStrategies:
    """Turn strategies for one call: a turn starts on VAD speech and ends as ``detector`` decides.

    "smart_turn": at each VAD stop (keep the VAD's stop_secs short) Smart Turn judges whether the turn
    is complete; if it says no, the turn still ends after ``max_silence_secs`` more silence.
    "silence": the turn ends after ``silence_secs`` of silence. ``enable_interruptions``: whether the
    caller starting to speak interrupts the agent (barge-in).
    """
    if detector == "smart_turn":
        analyzer = SharedSmartTurnAnalyzer(params=SmartTurnParams(stop_secs=max_silence_secs))
        stop = TurnAnalyzerUserTurnStopStrategy(turn_analyzer=analyzer, wait_for_transcript=False)
    elif detector == "silence":
        stop = SilenceUserTurnStopStrategy(silence_secs=silence_secs)
    else:
        raise ValueError(f"unknown turn detector {detector!r}; expected one of {TURN_DETECTORS}")
    start = VADUserTurnStartStrategy(enable_interruptions=enable_interruptions)
    return UserTurnStrategies(start=[start], stop=[stop])
