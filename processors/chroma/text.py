"""What the thinker reads: tokenizers, the chat layout of one call, and 16 kHz log-mel features.

The real model uses the checkpoint's Qwen tokenizer; the `tiny` preset uses bytes with
its own special ids (from its config). Both give the same `ChatLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from .config import LISTEN_RATE, ChromaConfig


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; special tokens come from the config."""

    def __init__(self, special_ids: dict[str, int]):
        self.special_ids = dict(special_ids)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class QwenTokenizer:
    """The checkpoint's own tokenizer (Qwen2), loaded from the checkpoint folder."""

    def __init__(self, folder: str | Path, config: ChromaConfig):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(folder))
        t = config.thinker_config
        self.special_ids = {
            "im_start": self._tok.convert_tokens_to_ids("<|im_start|>"),
            "im_end": config.im_end_token_id,
            "audio_token": t.audio_token_id,
            "audio_start": t.audio_start_token_id,
            "audio_end": t.audio_end_token_id,
        }

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def tokenizer_for(config: ChromaConfig, folder: str | Path | None):
    spec = config.extra.get("chroma_agents_tokenizer")
    if spec and spec.get("kind") == "bytes":
        return ByteTokenizer(spec["special_ids"])
    if folder is None:
        raise ValueError("this Chroma config needs its tokenizer files; load the model from its folder or hub id")
    return QwenTokenizer(folder, config)


@dataclass
class ChatLayout:
    """Qwen chat-template token layout for a spoken conversation."""

    tokenizer: ByteTokenizer | QwenTokenizer

    def _sp(self, name: str) -> int:
        return self.tokenizer.special_ids[name]

    def system(self, prompt: str) -> list[int]:
        enc = self.tokenizer.encode
        return [self._sp("im_start"), *enc("system\n" + prompt), self._sp("im_end"), *enc("\n")]

    def user_audio_turn(self, audio_tokens: int) -> list[int]:
        """The user's audio turn followed by the assistant header the reply continues from."""
        enc = self.tokenizer.encode
        return [
            self._sp("im_start"), *enc("user\n"), self._sp("audio_start"),
            *([self._sp("audio_token")] * audio_tokens),
            self._sp("audio_end"), self._sp("im_end"), *enc("\n"),
            self._sp("im_start"), *enc("assistant\n"),
        ]

    def assistant_start(self) -> list[int]:
        """The assistant header a reply with no new user audio continues from (after a tool's result,
        a flow node's new task, or text the agent is told to say)."""
        return [self._sp("im_start"), *self.tokenizer.encode("assistant\n")]

    def tool_response(self, body: str) -> list[int]:
        """A tool's result as the Qwen template gives it back: a user turn holding `<tool_response>`."""
        return [self._sp("im_start"), *self.tokenizer.encode("user\n" + body), self._sp("im_end"),
                *self.tokenizer.encode("\n")]

    def close_assistant(self, kept_ids: list[int]) -> list[int]:
        """The assistant's kept reply, closed as the chat template closes a turn."""
        return [*kept_ids, self._sp("im_end"), *self.tokenizer.encode("\n")]


class Listener:
    """16 kHz audio -> the thinker's 128-bin log-mel features and its audio-token count."""

    def __init__(self, model):
        self.model = model
        num_mel_bins = model.config.thinker_config.audio_config.num_mel_bins
        self._fe = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=LISTEN_RATE)

    def hear(self, audio_16k) -> tuple[torch.Tensor, torch.Tensor, int]:
        """-> (features, feature mask, number of audio placeholder tokens the chat needs)."""
        features, mask = self.features(audio_16k)
        return features, mask, int(self.model.audio_token_count(mask.sum(-1)).item())

    def features(self, audio_16k: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (input_features [1, mels, frames], feature_attention_mask [1, frames])."""
        audio = np.asarray(audio_16k, dtype=np.float32).reshape(-1)
        if audio.size < LISTEN_RATE // 10:  # the encoder needs a few frames; pad very short turns
            audio = np.pad(audio, (0, LISTEN_RATE // 10 - audio.size))
        out = self._fe(
            audio, sampling_rate=LISTEN_RATE, return_tensors="pt", padding="longest", return_attention_mask=True
        )
        return out["input_features"], out["attention_mask"]


def processor_inputs(model, voice: tuple[np.ndarray, str], user_audio_16k, system_prompt: str = "") -> dict:
    """The tensors the released processor produces for one first turn (the conformance seam's
    input), built exactly as a session builds its first turn."""
    features, mask, audio_tokens = Listener(model).hear(user_audio_16k)
    layout = ChatLayout(model.tokenizer)
    ids = torch.tensor([(layout.system(system_prompt) if system_prompt else []) + layout.user_audio_turn(audio_tokens)])
    ref, transcript = voice
    ref = np.asarray(ref, dtype=np.float32).reshape(-1)
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
