import numpy as np
import pytest

from processors.chroma import text
from processors.chroma.checkpoint import load_model


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_model(tiny):
    """The tiny model for tests that run whole calls: one load for the whole run."""
    return tiny


@pytest.fixture(scope="session")
def voice():
    rng = np.random.RandomState(7)
    t = np.arange(24000 * 2) / 24000
    audio = (0.2 * np.sin(2 * np.pi * 180 * t) + 0.05 * rng.randn(t.size)).astype(np.float32)
    return audio, "Hello, this is my voice."


def user_audio(seconds: float, seed: int) -> np.ndarray:
    return (np.random.RandomState(seed).randn(int(16000 * seconds)) * 0.1).astype(np.float32)


def processor_inputs(model, voice, audio_16k, system_prompt="You are a helpful agent."):
    """The tensors the released processor would produce for one turn."""
    return text.processor_inputs(model, voice, audio_16k, system_prompt)
