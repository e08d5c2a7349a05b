"""Several replies' thinkers, one greedy token each, in one pass.

`ThinkerStream._decode_one` runs transformers' whole multimodal forward for one token of one
reply. When the engine advances many replies per tick, `decode_together` does the same step for
all of them at once: embeddings, q/k/v, o_proj, the MLPs, the final norm and `lm_head` run on a
[B, H] batch (each weight is read once per tick, not once per reply), while attention runs per
reply over that reply's own `DynamicCache`, which keeps every cache exactly as a single-stream
forward leaves it (`truncate_cache`, later `_decode_one` calls and the next turn's prefill work
unchanged).

The maths mirror transformers' Qwen2.5-Omni text model op for op (RMSNorm in float32, q/k/v with
biases, TM-RoPE, SDPA or eager attention, gated MLP), so a batched token is the token a single
forward picks. Maths only: no threads, no sessions.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .generation import ThinkerStream
from .modeling import ChromaModel

# Rope types whose tables depend on the sequence length seen so far: a batch would mix lengths.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
_MIRRORED_ATTENTION = ("sdpa", "eager")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (turned * sin)


class ThinkerTextStep:
    """The thinker's text model (`model.thinker.model.language_model`) advanced by one token for
    each of several sequences, each with its own cache and position.

    Holds the modules, not copies of their tensors: weights read at call time stay right if a
    loader or a fusing pass later replaces a parameter's storage."""

    def __init__(self, model: ChromaModel):
        text = model.thinker.model.language_model
        cfg = text.config
        self.embed = text.embed_tokens
        self.layers = list(text.layers)
        self.norm = text.norm
        self.lm_head = model.thinker.lm_head
        self.rotary = text.rotary_emb
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.groups = self.heads // self.kv_heads
        self.attention = cfg._attn_implementation
        self.unsupported = self._why_unsupported(cfg)

    def _why_unsupported(self, cfg) -> str | None:
        if self.attention not in _MIRRORED_ATTENTION:
            return f"attention {self.attention!r} is not mirrored here"
        if any(kind != "full_attention" for kind in cfg.layer_types):
            return "sliding-window layers"
        if getattr(self.rotary, "rope_type", "default") in _LENGTH_DEPENDENT_ROPE:
            return f"rope type {self.rotary.rope_type!r} changes with length"
        if self.attention == "sdpa" and self.groups > 1 and self.head_dim > 256:
            return "head dim above 256 (transformers packs grouped queries instead)"
        return None

    def rotary_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B] -> cos, sin [B, 1, 1, head_dim].

        Generated text has equal temporal/height/width positions, so TM-RoPE's recomposition by
        `mrope_section` picks the same values from each component: the table is plain RoPE."""
        freqs = positions[:, None].float() * self.rotary.inv_freq.to(device=positions.device, dtype=torch.float)
        cos = freqs.cos() * self.rotary.attention_scaling
        sin = freqs.sin() * self.rotary.attention_scaling
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        return cos.to(dtype)[:, None, None], sin.to(dtype)[:, None, None]

    def _attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        """query [1, heads, 1, d] over one sequence's keys/values [1, kv_heads, L, d] -> [1, heads, 1, d]."""
        if self.attention == "sdpa":
            # As transformers' sdpa path for one new token without a mask: no causal flag, grouped
            # queries handed to SDPA as they are.
            return F.scaled_dot_product_attention(
                query, keys, values, attn_mask=None, dropout_p=0.0, scale=scaling, is_causal=False,
                **({"enable_gqa": True} if self.groups > 1 else {}),
            )
        if self.groups > 1:
            keys = keys.repeat_interleave(self.groups, dim=1)
            values = values.repeat_interleave(self.groups, dim=1)
        weights = torch.matmul(query, keys.transpose(2, 3)) * scaling
        weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(weights, values)

    def step(
        self, token_ids: torch.Tensor, positions: torch.Tensor, caches: list[DynamicCache]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """token_ids [B], positions [B] (long, on the model's device), one cache per row ->
        (final-norm hidden states [B, H], greedy next tokens [B]). Appends one position to each cache."""
        b = token_ids.shape[0]
        x = self.embed(token_ids)  # [B, H]
        cos, sin = self.rotary_tables(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = _rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            query = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(b, 1, -1, self.head_dim).transpose(1, 2)
            key = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(b, 1, -1, self.head_dim).transpose(1, 2)
            value = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(b, 1, -1, self.head_dim).transpose(1, 2)
            query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
            attended = []
            for row, cache in enumerate(caches):
                keys, values = cache.update(key[row : row + 1], value[row : row + 1], i)
                attended.append(self._attend(query[row : row + 1], keys, values, attn.scaling))
            out = torch.cat(attended).transpose(1, 2).reshape(b, -1)
            x = x + F.linear(out, attn.o_proj.weight, attn.o_proj.bias)
            h = _rms_norm(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
            gate = F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias)
            up = F.linear(h, mlp.up_proj.weight, mlp.up_proj.bias)
            x = x + F.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)
        hidden = _rms_norm(x, self.norm.weight, self.norm.variance_epsilon)
        tokens = F.linear(hidden, self.lm_head.weight, self.lm_head.bias).argmax(dim=-1)
        return hidden, tokens


_steps: weakref.WeakKeyDictionary[ChromaModel, ThinkerTextStep] = weakref.WeakKeyDictionary()


def thinker_text_step(model: ChromaModel) -> ThinkerTextStep:
    """The model's batched thinker step, built once per model."""
    step = _steps.get(model)
    if step is None:
        step = _steps[model] = ThinkerTextStep(model)
    return step


def _plain_dynamic(cache: DynamicCache, layers: int) -> bool:
    return len(cache.layers) == layers and all(type(layer) is DynamicLayer for layer in cache.layers)


@torch.inference_mode()
def decode_together(model: ChromaModel, streams: list[ThinkerStream]) -> None:
    """Advance every stream by one thinker token, as `stream._decode_one()` would, in one batched pass.

    Each stream's cache gains one position, its `next_position` moves on by one, and
    `stream._accept(hidden, token)` gets the same final-norm hidden state [1, H] and greedy token
    [1] a single forward gives. A configuration this step does not mirror (another attention
    kernel, sliding windows, a length-dependent rope, a non-dynamic cache) falls back to one
    forward per stream, so the result never depends on which path ran."""
    if not streams:
        return
    if len({id(s) for s in streams}) != len(streams):
        raise ValueError("decode_together: a stream appears twice")
    ended = [i for i, s in enumerate(streams) if s._ended]
    if ended:
        raise ValueError(f"decode_together: streams {ended} have ended; only streams still writing may decode")
    step = thinker_text_step(model)
    if step.unsupported is not None or not all(_plain_dynamic(s.cache, len(step.layers)) for s in streams):
        for stream in streams:
            stream._decode_one()
        return
    ids = torch.tensor([s.raw_tokens[-1] for s in streams], device=model.device)
    positions = torch.tensor([s.next_position for s in streams], device=model.device)
    hidden, tokens = step.step(ids, positions, [s.cache for s in streams])
    for row, stream in enumerate(streams):
        stream.next_position += 1
        stream._accept(hidden[row : row + 1], tokens[row : row + 1])
