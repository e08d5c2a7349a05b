"""Chroma's modules, laid out so that the released checkpoint's tensor names fit.

The thinker (Qwen2.5-Omni) and the codec (Mimi) are transformers' own classes; the
backbone and the depth decoder are Llama stacks fed with vectors, plus Chroma's own
heads and the shared audio-code embedding. This module holds modules and maths only: no
threads, no queues, no sessions, and no import of the generation or session code (the
loader builds `engine.ChromaEngine`, which adds those entry points on top).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, LlamaModel, MimiModel
from transformers.models.qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

from .config import ChromaConfig


class ChromaAudioEmbedding(nn.Module):
    """One table for all codebooks: code c of codebook k is row k * vocab + c."""

    def __init__(self, num_codebooks: int, vocab_size: int, dim: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed_audio_tokens = nn.Embedding(num_codebooks * vocab_size, dim)

    def rows(self, codes: torch.Tensor, first_codebook: int = 0) -> torch.Tensor:
        """codes [..., k] (codebooks first_codebook .. first_codebook+k-1) -> [..., k, dim]."""
        k = codes.shape[-1]
        offsets = (torch.arange(k, device=codes.device) + first_codebook) * self.vocab_size
        return self.embed_audio_tokens(codes + offsets)


def _vector_llama(config) -> LlamaModel:
    model = LlamaModel(config)
    # Inputs are vectors, never token ids: the released checkpoint has no embedding table here.
    model.embed_tokens = nn.Identity()
    return model


class ChromaBackbone(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.model = _vector_llama(config)
        self.codebook0_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.audio_embedding = ChromaAudioEmbedding(config.audio_num_codebooks, config.vocab_size, config.hidden_size)

    def frame_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., num_codebooks] -> [..., hidden]: the sum of the frame's code embeddings."""
        return self.audio_embedding.rows(codes).sum(dim=-2)


class ChromaCodebookHead(nn.Module):
    """One [hidden, vocab] matrix per decoder level (levels 1 .. num_codebooks-1)."""

    def __init__(self, levels: int, hidden: int, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(levels, hidden, vocab))

    def level_logits(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        return hidden @ self.weight[level - 1]


class ChromaDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.projection = nn.Linear(config.audio_embedding_dim, config.hidden_size, bias=False)
        self.model = _vector_llama(config)
        self.codebook_head = ChromaCodebookHead(config.audio_num_codebooks - 1, config.hidden_size, config.vocab_size)
        self.audio_embedding = ChromaAudioEmbedding(
            config.audio_num_codebooks, config.vocab_size, config.audio_embedding_dim
        )


def sample_top_k(logits: torch.Tensor, top_k: int, temperature: float, generator=None) -> torch.Tensor:
    logits = logits.float() / max(temperature, 1e-5)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class ChromaModel(nn.Module):
    """thinker -> backbone -> decoder -> codec, with the released module names."""

    def __init__(self, config: ChromaConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        for sub in (config.thinker_config, config.backbone_config, config.decoder_config, config.codec_config):
            sub._attn_implementation = attn_implementation
        config.thinker_config.text_config._attn_implementation = attn_implementation
        config.thinker_config.audio_config._attn_implementation = attn_implementation
        config.thinker_config.vision_config._attn_implementation = attn_implementation
        self.thinker = Qwen2_5OmniThinkerForConditionalGeneration(config.thinker_config)
        self.backbone = ChromaBackbone(config.backbone_config)
        self.decoder = ChromaDecoder(config.decoder_config)
        self.codec_model = MimiModel(config.codec_config)
        self.tie_weights()
        self.source = "unloaded"
        self.tokenizer = None  # set by the loader: the checkpoint's tokenizer

    def tie_weights(self) -> None:
        self.thinker.lm_head.weight = self.thinker.model.language_model.embed_tokens.weight
        self.backbone.audio_embedding.embed_audio_tokens.weight = self.decoder.audio_embedding.embed_audio_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.backbone.codebook0_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.codebook0_head.weight.dtype

    # -- thinker ---------------------------------------------------------------

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.thinker.model.language_model.embed_tokens(ids.to(self.device))

    def thinker_positions(self, input_ids: torch.Tensor, audio_feature_lengths: torch.Tensor | None) -> torch.Tensor:
        """TM-RoPE positions [3, 1, L] of a segment that starts at position 0."""
        mask = torch.ones_like(input_ids)
        positions, _ = self.thinker.model.get_rope_index(
            input_ids, None, None, mask, False, audio_feature_lengths, None
        )
        return positions

    def thinker_forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the thinker over new tokens with explicit 3-D positions; returns
        (final-norm hidden state at the last position [1, H], greedy next token [1])."""
        out = self.thinker.model(
            input_ids=input_ids.to(self.device),
            input_features=None if input_features is None else input_features.to(self.device, self.dtype),
            feature_attention_mask=None if feature_attention_mask is None else feature_attention_mask.to(self.device),
            position_ids=positions.to(self.device),
            cache=cache,
            use_cache=True,
        )
        last = out.last_hidden_state[:, -1]
        token = self.thinker.lm_head(last).argmax(dim=-1)
        return last, token

    def audio_token_count(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        _, out = self.thinker.model.audio_tower._get_feat_extract_output_lengths(feature_lengths)
        return out

    # -- backbone and decoder ----------------------------------------------------

    def backbone_forward(
        self, embeds: torch.Tensor, cache: DynamicCache, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """embeds [1, L, H] appended after the cache; returns the post-norm hidden state at the last position."""
        past = cache.get_seq_length()
        positions = torch.arange(past, past + embeds.shape[1], device=self.device).unsqueeze(0)
        out = self.backbone.model(
            inputs_embeds=embeds.to(self.dtype),
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        return out.last_hidden_state[:, -1]

    def decode_frame(
        self, backbone_hidden: torch.Tensor, do_sample: bool = False, top_k: int = 50,
        temperature: float = 0.9, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One frame's codes [1, num_codebooks] from the backbone's last hidden state [1, H].

        Decoder positions are 0 (backbone state), 1 (level-0 code), ..., n-1 (level n-2 code);
        the decoder's cache is fresh for every frame."""
        n = self.config.audio_num_codebooks
        level0_logits = self.backbone.codebook0_head(backbone_hidden)
        pick = (lambda lg: sample_top_k(lg, top_k, temperature, generator)) if do_sample else (
            lambda lg: lg.argmax(dim=-1))
        codes = [pick(level0_logits)]
        table = self.decoder.audio_embedding
        first = torch.stack([backbone_hidden, table.rows(codes[0].unsqueeze(-1))[:, 0]], dim=1)
        inputs = self.decoder.projection(first)
        cache = DynamicCache()
        for level in range(1, n):
            start = cache.get_seq_length()
            positions = torch.arange(start, start + inputs.shape[1], device=self.device).unsqueeze(0)
            out = self.decoder.model(inputs_embeds=inputs, position_ids=positions, cache=cache, use_cache=True)
            code = pick(self.decoder.codebook_head.level_logits(out.last_hidden_state[:, -1], level))
            codes.append(code)
            if level < n - 1:
                inputs = self.decoder.projection(table.rows(code.unsqueeze(-1), first_codebook=level))
        return torch.stack(codes, dim=-1)

    # -- codec -------------------------------------------------------------------

    def encode_audio(self, audio_24k: torch.Tensor) -> torch.Tensor:
        """[1, samples] or [1, 1, samples] float at 24 kHz -> codes [1, F, num_codebooks]."""
        if audio_24k.dim() == 2:
            audio_24k = audio_24k.unsqueeze(1)
        codes = self.codec_model.encode(audio_24k.to(self.device, self.dtype)).audio_codes
        return codes[:, : self.config.audio_num_codebooks].transpose(1, 2)
