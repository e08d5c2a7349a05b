"""One call's stereo recording, fed on a fake clock as a line would feed it: caller left, agent right,
aligned on the caller's stream, readable while it grows, muted where asked."""

import wave

import numpy as np

from records.recording import CallRecording, drain_recordings

RATE = 8000
CHUNK = 160  # 20 ms at 8 kHz


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def tone(freq: float, seconds: float, rate: int = RATE, level: float = 8000) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def chunks(pcm: np.ndarray, size: int = CHUNK):
    for i in range(0, len(pcm), size):
        yield pcm[i : i + size].tobytes()


def read(path) -> tuple[int, np.ndarray]:
    drain_recordings()
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (2, 2)
        return w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, 2)


def onset(channel: np.ndarray, level: int = 1000) -> float:
    return int(np.argmax(np.abs(channel) > level)) / RATE


def span(channel: np.ndarray) -> float:
    """Seconds from the first to the last sound."""
    loud = np.flatnonzero(np.abs(channel) > 1000)
    return (loud[-1] - loud[0] + 1) / RATE


def run_call(recording: CallRecording, clock: Clock, caller: np.ndarray, agent: dict[float, np.ndarray],
             *, caller_delay: float = 0.0, until: float | None = None) -> None:
    """Caller audio arrives in real time (after `caller_delay`, the queued part in one burst); agent
    pieces are written at their times (in real time, 20 ms each)."""
    pieces = [(i * CHUNK / RATE + CHUNK / RATE, c) for i, c in enumerate(chunks(caller))]
    agent_chunks = [(at + (i + 1) * CHUNK / RATE, c) for at, pcm in agent.items() for i, c in enumerate(chunks(pcm))]
    events = sorted([(max(t, caller_delay), 0, c) for t, c in pieces] + [(t, 1, c) for t, c in agent_chunks])
    start = clock.t
    for t, side, data in events:
        if until is not None and t > until:
            break
        clock.t = start + t
        (recording.agent if side else recording.caller)(data, RATE)


def test_caller_left_agent_right_aligned_on_the_callers_stream(tmp_path):
    clock = Clock()
    recording = CallRecording(tmp_path / "a.wav", RATE, clock=clock)
    caller = np.concatenate([np.zeros(RATE // 2, np.int16), tone(300, 1.0), np.zeros(RATE * 2, np.int16)])
    run_call(recording, clock, caller, {2.0: tone(1000, 0.6)})
    recording.close()
    rate, pcm = read(tmp_path / "a.wav")
    assert rate == RATE and len(pcm) == len(caller)
    assert np.array_equal(pcm[:, 0], caller)  # the caller's side is their stream, sample for sample
    assert abs(onset(pcm[:, 1]) - 2.0) <= 0.021  # the agent where it was written, to a chunk
    assert np.abs(pcm[: 2 * RATE - CHUNK, 1]).max() == 0  # and silence before


def test_audio_that_queued_at_the_start_keeps_its_place_against_the_agent(tmp_path):
    clock = Clock()
    recording = CallRecording(tmp_path / "b.wav", RATE, clock=clock)
    # the pipeline starts 1.2 s late: the caller's first 1.2 s arrive at once, then in real time
    caller = np.concatenate([np.zeros(RATE // 2, np.int16), tone(300, 1.0), np.zeros(RATE * 2, np.int16)])
    run_call(recording, clock, caller, {2.5: tone(1000, 0.5)}, caller_delay=1.2)
    recording.close()
    _, pcm = read(tmp_path / "b.wav")
    assert abs(onset(pcm[:, 0]) - 0.5) < 0.01
    assert abs(onset(pcm[:, 1]) - 2.5) <= 0.021


def test_the_file_is_playable_while_it_grows(tmp_path):
    clock = Clock()
    recording = CallRecording(tmp_path / "c.wav", RATE, clock=clock)
    caller = tone(300, 4.0)
    run_call(recording, clock, caller, {1.0: tone(1000, 1.0)}, until=3.0)  # the call is 3 s in
    rate, pcm = read(tmp_path / "c.wav")  # not closed: what a killed process leaves
    size = (tmp_path / "c.wav").stat().st_size
    assert len(pcm) == (size - 44) // 4  # the header's sizes match what is on disk
    assert 3.0 - 0.25 - 0.5 - 0.03 <= len(pcm) / rate <= 3.0  # all but the last lag and flush interval
    assert np.array_equal(pcm[:, 0], caller[: len(pcm)])
    assert abs(onset(pcm[:, 1]) - 1.0) <= 0.021
    recording.close()
    _, whole = read(tmp_path / "c.wav")
    assert np.array_equal(whole[: len(pcm)], pcm) and len(whole) > len(pcm)


def test_a_muted_caller_is_silence_and_the_agent_is_resampled_to_the_lines_rate(tmp_path):
    clock = Clock()
    recording = CallRecording(tmp_path / "d.wav", RATE, clock=clock)
    caller = tone(300, 3.0)
    start = clock.t
    for i, piece in enumerate(chunks(caller)):
        clock.t = start + (i + 1) * CHUNK / RATE
        recording.caller_muted = 1.0 <= clock.t - start < 2.0
        recording.caller(piece, RATE)
        if i == 50:  # 24 kHz agent audio (the engine's rate) written at 1.02 s
            recording.agent(tone(1000, 0.3, rate=24000).tobytes(), 24000)
    recording.close()
    _, pcm = read(tmp_path / "d.wav")
    left = pcm[:, 0]
    assert np.abs(left[round(1.02 * RATE) : round(1.98 * RATE)]).max() == 0
    assert np.abs(left[: round(0.98 * RATE)]).min() >= 0 and np.abs(left[: RATE - CHUNK]).max() > 1000
    assert np.abs(left[round(2.02 * RATE) :]).max() > 1000
    assert abs(span(pcm[:, 1]) - 0.3) < 0.005  # 0.3 s at 24 kHz became 0.3 s at 8 kHz


def test_audio_cleared_unplayed_is_taken_off_the_agents_side(tmp_path):
    clock = Clock()
    recording = CallRecording(tmp_path / "e.wav", RATE, clock=clock)
    caller = tone(300, 2.0)
    start = clock.t
    for i, piece in enumerate(chunks(caller)):
        clock.t = start + (i + 1) * CHUNK / RATE
        recording.caller(piece, RATE)
        if i == 25:  # 0.5 s sent ahead at once; the line played 0.2 s of it before the barge-in cleared it
            recording.agent(tone(1000, 0.5).tobytes(), RATE)
        if i == 35:
            recording.cut_agent(0.3)
    recording.close()
    _, pcm = read(tmp_path / "e.wav")
    assert abs(span(pcm[:, 1]) - 0.2) < 0.005
