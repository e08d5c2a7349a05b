import numpy as np
import pytest
import torch

from processors.chroma.checkpoint import load_model
from processors.chroma.text import ChatLayout, Listener


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny", device="cpu")


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
    listener = Listener(model.config.thinker_config.audio_config.num_mel_bins)
    features, mask = listener.features(audio_16k)
    layout = ChatLayout(model.tokenizer)
    n_audio = int(model.audio_token_count(mask.sum(-1)))
    ids = torch.tensor([layout.system(system_prompt) + layout.user_audio_turn(n_audio)])
    ref, transcript = voice
    text = torch.tensor([model.tokenizer.encode(transcript)])
    return {
        "thinker_input_ids": ids,
        "thinker_attention_mask": torch.ones_like(ids),
        "thinker_input_features": features,
        "thinker_feature_attention_mask": mask,
        "input_ids": text,
        "attention_mask": torch.ones_like(text),
        "input_values": torch.from_numpy(ref).view(1, 1, -1),
        "input_values_cutoffs": torch.tensor([ref.size]),
    }
