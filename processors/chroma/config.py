"""Chroma configuration: the released `config.json` layout, and the `tiny` preset.

Field names follow the released checkpoint (FlashLabs/Chroma-4B): a top-level
`model_type: chroma` with `thinker_config`, `backbone_config`, `decoder_config`,
`codec_config` and the special ids. Nothing elsewhere hard-codes an id or a width.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, MimiConfig
from transformers.models.qwen2_5_omni import Qwen2_5OmniThinkerConfig

# The model's audio clock lives in rates.py, which imports nothing; these names stay importable from here.
from .rates import FRAME_SECONDS as FRAME_SECONDS
from .rates import LISTEN_RATE as LISTEN_RATE
from .rates import SAMPLE_RATE as SAMPLE_RATE


@strict
class ChromaBackboneConfig(LlamaConfig):
    """Llama-3 style transformer over vectors; `codebook0_head` predicts level 0."""

    model_type = "chroma_backbone"
    audio_num_codebooks: int = 8
    vocab_size: int = 2051


@strict
class ChromaDecoderConfig(LlamaConfig):
    """Small Llama that fills levels 1..7 of one frame; `audio_embedding_dim` is the backbone width."""

    model_type = "chroma_decoder"
    audio_num_codebooks: int = 8
    audio_embedding_dim: int = 2048
    vocab_size: int = 2051


class ConfigError(ValueError):
    """A config file or dict that is not a usable Chroma config."""


# Top-level ids and sizes, with the released model's values as defaults.
_TOP_LEVEL_DEFAULTS: dict[str, Any] = {
    "audio_num_codebooks": 8,
    "audio_frame_freq": 1920,
    "codebook_pad_token_id": 2050,
    "codebook_eos_token_id": 0,
    "text_start_token_id": 151665,
    "text_end_token_id": 151666,
    "im_end_token_id": 151645,
}


@dataclass
class ChromaConfig:
    thinker_config: Qwen2_5OmniThinkerConfig
    backbone_config: ChromaBackboneConfig
    decoder_config: ChromaDecoderConfig
    codec_config: MimiConfig
    audio_num_codebooks: int = 8
    audio_frame_freq: int = 1920
    codebook_pad_token_id: int = 2050
    codebook_eos_token_id: int = 0
    text_start_token_id: int = 151665
    text_end_token_id: int = 151666
    im_end_token_id: int = 151645
    # Keys we do not use but keep so that a saved config round-trips.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def audio_vocab_size(self) -> int:
        return self.backbone_config.vocab_size

    @property
    def is_tiny(self) -> bool:
        return bool(self.extra.get("chroma_agents_preset") == "tiny")

    # -- (de)serialisation -------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ChromaConfig:
        data = copy.deepcopy(data)
        if data.get("model_type") != "chroma":
            raise ConfigError(
                f"{source}: model_type is {data.get('model_type')!r}, expected 'chroma' "
                "(this is not a Chroma checkpoint config)"
            )
        subs = {}
        for key, kind in (
            ("thinker_config", Qwen2_5OmniThinkerConfig),
            ("backbone_config", ChromaBackboneConfig),
            ("decoder_config", ChromaDecoderConfig),
            ("codec_config", MimiConfig),
        ):
            sub = data.pop(key, None)
            if not isinstance(sub, dict):
                raise ConfigError(f"{source}: field {key!r} is {type(sub).__name__}, expected an object")
            sub.pop("model_type", None)
            try:
                subs[key] = kind(**sub)
            except Exception as exc:  # transformers raises several types for bad values
                raise ConfigError(f"{source}: field {key!r} is invalid: {exc}") from exc
        data.pop("model_type")
        top = {k: data.pop(k, v) for k, v in _TOP_LEVEL_DEFAULTS.items()}
        for k, v in top.items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"{source}: field {k!r} is {v!r}, expected an integer")
        config = cls(**subs, **top, extra=data)
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> ChromaConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found (a Chroma checkpoint folder holds config.json)") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON at line {exc.lineno}: {exc.msg}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model_type": "chroma", "architectures": ["ChromaForConditionalGeneration"]}
        for key in ("thinker_config", "backbone_config", "decoder_config", "codec_config"):
            sub = getattr(self, key).to_dict()
            sub["model_type"] = type(getattr(self, key)).model_type
            out[key] = sub
        for key in _TOP_LEVEL_DEFAULTS:
            out[key] = getattr(self, key)
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    def validate(self, source: str = "<config>") -> None:
        n = self.audio_num_codebooks
        b, d, c = self.backbone_config, self.decoder_config, self.codec_config
        checks = [
            ("backbone_config.audio_num_codebooks", b.audio_num_codebooks, n),
            ("decoder_config.audio_num_codebooks", d.audio_num_codebooks, n),
            ("decoder_config.vocab_size", d.vocab_size, b.vocab_size),
            ("decoder_config.audio_embedding_dim", d.audio_embedding_dim, b.hidden_size),
            ("thinker_config.text_config.hidden_size", self.thinker_config.text_config.hidden_size, b.hidden_size),
        ]
        for name, got, want in checks:
            if got != want:
                raise ConfigError(f"{source}: {name} is {got}, expected {want}")
        if c.num_quantizers < n:
            raise ConfigError(f"{source}: codec_config.num_quantizers is {c.num_quantizers}, expected >= {n}")
        if c.frame_size != self.audio_frame_freq:
            raise ConfigError(
                f"{source}: codec frame size is {c.frame_size} samples, audio_frame_freq is "
                f"{self.audio_frame_freq}; they must agree"
            )
        for name in ("codebook_pad_token_id", "codebook_eos_token_id"):
            if not 0 <= getattr(self, name) < b.vocab_size:
                raise ConfigError(f"{source}: {name} is {getattr(self, name)}, expected 0..{b.vocab_size - 1}")
        vocab = self.thinker_config.text_config.vocab_size
        for name in ("text_start_token_id", "text_end_token_id", "im_end_token_id"):
            if not 0 <= getattr(self, name) < vocab:
                raise ConfigError(f"{source}: {name} is {getattr(self, name)}, expected 0..{vocab - 1}")


# -- the tiny preset ---------------------------------------------------------

# Byte-level text for the tiny model: ids 0..255 are bytes, specials follow.
TINY_SPECIALS = {
    "im_start": 256,
    "im_end": 257,
    "audio_token": 258,
    "audio_start": 259,
    "audio_end": 260,
    "text_start": 261,
    "text_end": 262,
    "image_token": 263,
    "video_token": 264,
    "vision_start": 265,
    "vision_end": 266,
    "user": 267,
}
TINY_VOCAB = 320


def tiny_config_dict() -> dict[str, Any]:
    """The same architecture at toy size: hidden 64, 2 layers, Mimi with 1920 samples per frame."""
    s = TINY_SPECIALS
    hidden = 64
    llama = dict(
        hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=500000.0, rms_norm_eps=1e-5,
    )
    return {
        "model_type": "chroma",
        "chroma_agents_preset": "tiny",
        "chroma_agents_tokenizer": {"kind": "bytes", "special_ids": s},
        "thinker_config": {
            "audio_config": dict(
                num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                d_model=hidden, output_dim=hidden, n_window=100, max_source_positions=1500,
            ),
            "vision_config": dict(
                depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                fullatt_block_indexes=[0],
            ),
            "text_config": dict(
                vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            ),
            "audio_token_index": s["audio_token"],
            "image_token_index": s["image_token"],
            "video_token_index": s["video_token"],
            "audio_start_token_id": s["audio_start"],
            "audio_end_token_id": s["audio_end"],
            "vision_start_token_id": s["vision_start"],
            "vision_end_token_id": s["vision_end"],
            "user_token_id": s["user"],
        },
        "backbone_config": dict(llama, audio_num_codebooks=8, vocab_size=2051, max_position_embeddings=4096),
        "decoder_config": dict(
            llama, audio_num_codebooks=8, audio_embedding_dim=hidden, vocab_size=2051, max_position_embeddings=33,
        ),
        "codec_config": dict(
            hidden_size=32, num_filters=8, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            head_dim=8, intermediate_size=64, codebook_dim=16, vector_quantization_hidden_dimension=16,
            upsample_groups=32, num_quantizers=8, codebook_size=2048, upsampling_ratios=[8, 6, 5, 4],
            sliding_window=250,
        ),
        "audio_num_codebooks": 8,
        "audio_frame_freq": 1920,
        "codebook_pad_token_id": 2050,
        "codebook_eos_token_id": 0,
        "text_start_token_id": s["text_start"],
        "text_end_token_id": s["text_end"],
        "im_end_token_id": s["im_end"],
    }


def tiny_config() -> ChromaConfig:
    return ChromaConfig.from_dict(tiny_config_dict(), source="tiny preset")


# -- the random-4b preset ------------------------------------------------------

def random_4b_config_dict() -> dict[str, Any]:
    """The released model's dimensions (Qwen2.5-Omni-3B thinker, 1B backbone, 100M decoder, Mimi)
    with the tiny preset's byte tokenizer and ids: for timing the real compute on a GPU without the
    weights. Only the vision tower, which a speech agent never runs, stays small."""
    d = tiny_config_dict()
    d["chroma_agents_preset"] = "random-4b"
    t = d["thinker_config"]
    t["audio_config"] = dict(
        num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
        d_model=1280, output_dim=2048, n_window=100, max_source_positions=1500,
    )
    t["vision_config"]["out_hidden_size"] = 2048
    t["text_config"] = dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    )
    llama = dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5,
    )
    d["backbone_config"] = dict(llama, audio_num_codebooks=8, vocab_size=2051, max_position_embeddings=2048)
    d["decoder_config"] = dict(
        llama, hidden_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=128, audio_num_codebooks=8, audio_embedding_dim=2048, vocab_size=2051, max_position_embeddings=33,
    )
    d["codec_config"] = dict(
        hidden_size=512, num_filters=64, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        head_dim=64, intermediate_size=2048, codebook_dim=256, vector_quantization_hidden_dimension=256,
        upsample_groups=512, num_quantizers=8, codebook_size=2048, upsampling_ratios=[8, 6, 5, 4],
        sliding_window=250,
    )
    return d


def preset_config(name: str) -> ChromaConfig:
    """A built-in preset's config: 'tiny' or 'random-4b'."""
    makers = {"tiny": tiny_config_dict, "random-4b": random_4b_config_dict}
    if name not in makers:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(makers)}")
    return ChromaConfig.from_dict(makers[name](), source=f"{name} preset")
