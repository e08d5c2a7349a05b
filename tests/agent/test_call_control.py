"""A flow's `play` action on a call: any audio file, at any rate, reaches the call at its output rate."""

from types import SimpleNamespace

import numpy as np
import pytest
import soundfile

from agent.call_control import PipelineCallControl
from processors.audio_io import AudioFileError


class QueuedFrames:
    def __init__(self):
        self.frames = []

    async def queue_frame(self, frame):
        self.frames.append(frame)


def fake_call(out_rate: int):
    return SimpleNamespace(service=SimpleNamespace(out_rate=out_rate), worker=QueuedFrames())


@pytest.mark.parametrize("rate,subtype,suffix", [(44100, "PCM_24", ".wav"), (22050, "FLOAT", ".wav"), (11025, "PCM_16", ".flac")])
async def test_play_resamples_any_file_to_the_calls_output_rate(tmp_path, rate, subtype, suffix):
    path = tmp_path / f"hold{suffix}"
    t = np.arange(rate // 2) / rate
    soundfile.write(str(path), 0.5 * np.sin(2 * np.pi * 300 * t), rate, subtype=subtype)
    call = fake_call(8000)
    await PipelineCallControl(call).play(path)
    (frame,) = call.worker.frames
    pcm = np.frombuffer(frame.audio, np.int16)
    assert frame.rate == 8000 and pcm.size == pytest.approx(4000, abs=1)
    assert np.abs(pcm).max() == pytest.approx(16384, rel=0.05)


async def test_play_of_an_unusable_file_names_it(tmp_path):
    path = tmp_path / "hold.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioFileError, match=r"hold.wav: empty file \(0 bytes\)"):
        await PipelineCallControl(fake_call(8000)).play(path)
