"""The backbone's and the depth decoder's Llama stacks, stepped for inference.

Same weights and the same maths as transformers' `LlamaModel` (RMSNorm in float32, rotary
tables from the model's own `rotary_emb`, grouped-query attention, gated MLP), without what a
serving loop does not need: no cache objects, no per-call wrappers or output capture, no mask
builders. Keys and values live in tensors the caller preallocates (`KVPool`), so a step
allocates nothing that depends on history, and every shape can be made static for CUDA graphs.

q/k/v and gate/up are fused into one matrix each; the original parameters become views into
the fused ones, so the model's state dict (and the released checkpoint's names) is unchanged
and no weight is held twice.

Maths only: no threads, no sessions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaModel


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    out_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    act: object


def _fuse(first: nn.Linear, *rest: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One [sum(out), in] matrix for several Linear layers over the same input; each layer's
    weight (and bias) becomes a view of its rows, so nothing is stored twice."""
    layers = (first, *rest)
    weight = torch.cat([m.weight.detach() for m in layers], dim=0)
    bias = None
    if first.bias is not None:
        bias = torch.cat([m.bias.detach() for m in layers], dim=0)
    row = 0
    for m in layers:
        n = m.weight.shape[0]
        m.weight.data = weight[row : row + n]
        if bias is not None:
            m.bias.data = bias[row : row + n]
        row += n
    return weight, bias


class LlamaStack:
    """A `LlamaModel` (fed with vectors) as a function of (inputs, positions, key/value store)."""

    def __init__(self, model: LlamaModel):
        cfg = model.config
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = model.norm.variance_epsilon
        self.max_positions = cfg.max_position_embeddings
        rotary = model.rotary_emb
        if getattr(rotary, "rope_type", "default") in ("dynamic", "longrope"):
            raise NotImplementedError(f"rope type {rotary.rope_type!r} changes with length; the frame step needs fixed tables")
        self.inv_freq = rotary.inv_freq.detach().float()
        self.rope_scaling = float(rotary.attention_scaling)
        self.final_norm = model.norm.weight.detach()
        self.layers: list[_Layer] = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, qkv_bias = _fuse(attn.q_proj, attn.k_proj, attn.v_proj)
            gate_up, gate_up_bias = _fuse(mlp.gate_proj, mlp.up_proj)
            self.layers.append(_Layer(
                layer.input_layernorm.weight.detach(), qkv, qkv_bias,
                attn.o_proj.weight.detach(), None if attn.o_proj.bias is None else attn.o_proj.bias.detach(),
                layer.post_attention_layernorm.weight.detach(), gate_up, gate_up_bias,
                mlp.down_proj.weight.detach(), None if mlp.down_proj.bias is None else mlp.down_proj.bias.detach(),
                mlp.act_fn,
            ))
        self.q_size = self.heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim
        self.intermediate = self.layers[0].gate_up.shape[0] // 2 if self.layers else 0

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # transformers' LlamaRMSNorm: normalise in float32, cast back, then scale (one fused op here)
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, q] -> cos, sin [B, q, 1, head_dim] (broadcast over heads)."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.rope_scaling).to(dtype).unsqueeze(2)
        sin = (angles.sin() * self.rope_scaling).to(dtype).unsqueeze(2)
        return cos, sin

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + turned * sin

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        store: KeyValueWriter,
        mask: torch.Tensor | None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """x [B, q, H] -> final-norm hidden states [B, q, H].

        `store.write(layer, k, v)` files the new keys/values and returns the keys/values to attend
        over ([B, kv_heads, L, head_dim]); `mask` [B, 1, q, L] (True = attend) or None with
        `is_causal` for a square causal block."""
        b, q, _ = x.shape
        cos, sin = rope
        for i, layer in enumerate(self.layers):
            h = self.rms_norm(x, layer.input_norm)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            # queries and keys sit side by side in the fused output: one rotation for both
            rotated = self._rotate(qkv[..., : self.q_size + self.kv_size].view(b, q, -1, self.head_dim), cos, sin)
            query, key = rotated.transpose(1, 2).split((self.heads, self.kv_heads), dim=1)
            value = qkv[..., self.q_size + self.kv_size :].view(b, q, self.kv_heads, self.head_dim).transpose(1, 2)
            keys, values = store.write(i, key, value)
            attended = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, is_causal=is_causal and mask is None,
                scale=self.head_dim**-0.5, enable_gqa=self.kv_heads != self.heads,
            )
            attended = attended.transpose(1, 2).reshape(b, q, self.q_size)
            x = x + F.linear(attended, layer.out, layer.out_bias)
            h = self.rms_norm(x, layer.post_norm)
            gate, up = F.linear(h, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
            x = x + F.linear(layer.act(gate) * up, layer.down, layer.down_bias)
        return self.rms_norm(x, self.final_norm)


class KeyValueWriter(Protocol):
    """Where a step's new keys/values go, and what it attends over (`KVPool`, `ScratchKV`)."""

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class KVPool:
    """Keys/values for many sequences, one row each: [layers][rows, kv_heads, capacity, head_dim].

    Rows 0..B-1 are the sequences in the current batch (the caller keeps them packed), each at its
    own length. `prepare(lengths, width, span)` sets where this step writes (row b at lengths[b] ..
    lengths[b] + width - 1) and how many positions it attends over (`span`)."""

    def __init__(self, stack: LlamaStack, rows: int, capacity: int, device, dtype):
        shape = (rows, stack.kv_heads, capacity, stack.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(stack.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(stack.num_layers)]
        self.rows, self.capacity = rows, capacity
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._batch, self._span = 0, 0

    def prepare(self, lengths: torch.Tensor, width: int, span: int) -> None:
        """lengths [B] (long, on the pool's device): each row's filled positions before this step."""
        batch = lengths.shape[0]
        positions = lengths[:, None] + torch.arange(width, device=lengths.device)
        self._index = (torch.arange(batch, device=lengths.device)[:, None].expand(batch, width), positions)
        self._batch, self._span = batch, span

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, positions = self._index
        k, v = self.keys[layer], self.values[layer]
        # [B, kv, q, d] -> [B, q, kv, d] so that (row, position) index the first two dims of the view
        k.transpose(1, 2).index_put_((rows, positions), key.transpose(1, 2))
        v.transpose(1, 2).index_put_((rows, positions), value.transpose(1, 2))
        return k[: self._batch, :, : self._span], v[: self._batch, :, : self._span]

    def load(self, row: int, keys_values: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Copy a prefix (per layer [1, kv, P, d]) into a row; returns its length P."""
        length = keys_values[0][0].shape[-2]
        if length > self.capacity:
            raise ValueError(f"a prefix of {length} positions does not fit a cache of {self.capacity}")
        for layer, (k, v) in enumerate(keys_values):
            self.keys[layer][row, :, :length] = k[0]
            self.values[layer][row, :, :length] = v[0]
        return length

    def move(self, source: int, target: int, length: int) -> None:
        """Copy row `source`'s first `length` positions to row `target` (keeping the batch packed)."""
        for k, v in zip(self.keys, self.values, strict=True):
            k[target, :, :length] = k[source, :, :length]
            v[target, :, :length] = v[source, :, :length]


class ScratchKV:
    """The depth decoder's cache: at most `capacity` positions (one frame), every row at the same length."""

    def __init__(self, stack: LlamaStack, rows: int, capacity: int, device, dtype):
        shape = (rows, stack.kv_heads, capacity, stack.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(stack.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(stack.num_layers)]
        self.rows = rows
        self.length = 0
        self._batch = 0

    def reset(self, batch: int) -> None:
        self.length, self._batch = 0, batch

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + key.shape[-2]
        k, v = self.keys[layer], self.values[layer]
        k[: self._batch, :, start:end] = key
        v[: self._batch, :, start:end] = value
        if layer == len(self.keys) - 1:
            self.length = end
        return k[: self._batch, :, :end], v[: self._batch, :, :end]
