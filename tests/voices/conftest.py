"""Reference recordings for the voice tests: espeak-ng speech, changed to break one rule at a time."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from processors.audio_io import to_float
from tests.speech import synthesize

ROOT = Path(__file__).resolve().parents[2]
DEMO_VOICE = ROOT / "examples" / "voices" / "demo"
RATE = 24000
SENTENCE = "Hello, thanks for calling the support line. How can I help you with your order today?"


def speech(text: str = SENTENCE, rate: int = RATE) -> np.ndarray:
    return to_float(synthesize(text, rate))


def save(path: Path, audio: np.ndarray, rate: int = RATE, **kwargs) -> Path:
    soundfile.write(str(path), audio, rate, **kwargs)
    return path


@pytest.fixture
def demo_voice(tmp_path) -> Path:
    """A copy of the example voice, without any codes stored beside the original."""
    folder = tmp_path / "demo"
    shutil.copytree(DEMO_VOICE, folder, ignore=shutil.ignore_patterns("codes"))
    return folder
