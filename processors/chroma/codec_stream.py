"""Streaming decoder for transformers' `MimiModel`: codes frame by frame in, audio out as soon as it is final.

The one-shot `MimiModel.decode` is causal end to end, so a stream that carries each stateful layer's
state from call to call reproduces it exactly:
  - quantizer: frame-wise, stateless;
  - transposed convolutions (`upsample` and the SEANet upsamplers): the overlapping right tail of the
    output (`kernel - stride` samples) is held back and added to the head of the next chunk's output;
  - decoder transformer: the last `sliding_window - 1` keys/values of each layer, with positions
    continuing from the number of steps seen;
  - causal `MimiConv1d`s: each conv's last `padding_total` input samples are its left context;
  - ELU / identity: pointwise.

The maths is Mimi's, but run on the layers' weights directly rather than through the modules and
transformers' cache and mask wrappers: at codec sizes those wrappers, not the arithmetic, were most
of the cost. The same code decodes one stream or many at once (`decode_together`): streams are
stacked along the batch, each conv runs once, and the transformer attends over per-row keys padded
to the longest cache, with a mask for each row's own positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MimiModel
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConvTranspose1d,
    MimiResnetBlock,
)


@dataclass
class _Conv:
    """A causal stride-1 conv; its state is its last `context` input samples."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    dilation: int
    groups: int
    context: int
    replicate: bool  # a fresh stream's context repeats its first sample (pad_mode="replicate")
    offset: int  # where its state starts in a stream's carry
    channels: int


@dataclass
class _ConvTranspose:
    """A transposed conv; its state is the overlapping tail of its last output, bias removed."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: int
    groups: int
    overlap: int
    offset: int
    channels: int
    # [in, out * kernel] when kernel == 2 * stride and groups == 1 (every SEANet upsampler): see `_upsample`
    matrix: torch.Tensor | None = None


@dataclass
class _Residual:
    block: list
    shortcut: _Conv | None  # None: identity


@dataclass
class _Elu:
    alpha: float


@dataclass
class _Layer:
    """One `MimiTransformerLayer`'s weights."""

    norm1: nn.LayerNorm
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o_bias: torch.Tensor | None
    attn_scale: torch.Tensor
    norm2: nn.LayerNorm
    fc1: torch.Tensor
    fc2: torch.Tensor
    activation: nn.Module
    mlp_scale: torch.Tensor


class _Plan:
    """The codec decoder as a flat program over its weights (no copies: the tensors are the codec's)."""

    def __init__(self, codec: MimiModel):
        decoder = codec.decoder
        self.carry_size = 0  # floats of conv context and transposed-conv tails per stream row
        self.upsample = self._conv_transpose(decoder.upsample) if decoder.upsample is not None else None
        self.seanet = [self._op(layer) for layer in decoder.decoder_seanet.layers]

        transformer = decoder.decoder_transformer
        config = transformer.config
        if transformer.rotary_emb.rope_type != "default":
            raise NotImplementedError("streaming needs the default rotary embedding")
        self.inv_freq = transformer.rotary_emb.inv_freq
        self.rotary_scaling = transformer.rotary_emb.attention_scaling
        self.window = config.sliding_window  # None: no window
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = transformer.layers[0].self_attn.scaling if transformer.layers else 1.0
        self.layers = [self._layer(layer) for layer in transformer.layers]

    def _op(self, layer: nn.Module):
        if isinstance(layer, MimiConv1d):
            return self._conv(layer)
        if isinstance(layer, MimiConvTranspose1d):
            return self._conv_transpose(layer)
        if isinstance(layer, MimiResnetBlock):
            shortcut = layer.shortcut
            if not isinstance(shortcut, (MimiConv1d, nn.Identity)):
                raise NotImplementedError(f"no streaming rule for {type(shortcut).__name__}")
            block = [self._op(sub) for sub in layer.block]
            return _Residual(block, self._conv(shortcut) if isinstance(shortcut, MimiConv1d) else None)
        if isinstance(layer, nn.ELU):
            return _Elu(layer.alpha)
        if isinstance(layer, nn.Identity):
            return None
        raise NotImplementedError(f"no streaming rule for {type(layer).__name__}")

    def _conv(self, layer: MimiConv1d) -> _Conv:
        conv = layer.conv
        # A strided causal conv pads its last partial window on the right, which a stream cannot know yet.
        if not layer.causal or conv.stride[0] != 1:
            raise NotImplementedError("streaming needs causal stride-1 SEANet convolutions")
        if layer.pad_mode not in ("constant", "replicate"):
            raise NotImplementedError(f"no streaming rule for pad_mode={layer.pad_mode!r}")
        context = int(layer.padding_total)
        op = _Conv(
            conv.weight,
            conv.bias,
            conv.dilation[0],
            conv.groups,
            context,
            layer.pad_mode == "replicate",
            self.carry_size,
            layer.in_channels,
        )
        self.carry_size += layer.in_channels * context
        return op

    def _conv_transpose(self, layer: MimiConvTranspose1d) -> _ConvTranspose:
        conv = layer.conv
        # A left trim (trim_right_ratio < 1) would need look-ahead into the next chunk.
        if layer.padding_left != 0:
            raise NotImplementedError("streaming needs trim_right_ratio == 1")
        overlap = conv.kernel_size[0] - conv.stride[0]
        op = _ConvTranspose(
            conv.weight, conv.bias, conv.stride[0], conv.groups, overlap, self.carry_size, conv.out_channels
        )
        if conv.groups == 1 and overlap == conv.stride[0]:
            op.matrix = conv.weight.view(conv.in_channels, -1)  # a view: in-place weight updates show through
        self.carry_size += conv.out_channels * overlap
        return op

    @staticmethod
    def _layer(layer: nn.Module) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return _Layer(
            layer.input_layernorm,
            attn.q_proj.weight,
            attn.k_proj.weight,
            attn.v_proj.weight,
            attn.o_proj.weight,
            attn.q_proj.bias,
            attn.k_proj.bias,
            attn.v_proj.bias,
            attn.o_proj.bias,
            layer.self_attn_layer_scale.scale,
            layer.post_attention_layernorm,
            mlp.fc1.weight,
            mlp.fc2.weight,
            mlp.activation_fn,
            layer.mlp_layer_scale.scale,
        )


@dataclass
class _Rows:
    """The state of a batch of stream rows for one pass: read from the streams, written back after."""

    carry: torch.Tensor  # [B, carry_size]
    fresh: torch.Tensor | None  # [B, 1, 1] bool, only for replicate-padded convs
    new_carry: list[torch.Tensor] = field(default_factory=list)  # [B, n] pieces, in plan order


class _KeyValues:
    """One stream's transformer state: the last keys/values of every layer in one tensor
    [rows, layers, 2, kv_heads, length, head_dim], and the number of steps seen (the next position)."""

    def __init__(self, keys_values: torch.Tensor | None = None, steps: int = 0):
        self.keys_values = keys_values
        self.steps = steps

    @property
    def length(self) -> int:
        return 0 if self.keys_values is None else self.keys_values.shape[-2]

    @property
    def layers(self) -> list:
        """Per-layer views with `.keys` / `.values`, as a transformers cache layer has."""
        if self.keys_values is None:
            return []
        kv = self.keys_values
        return [_LayerView(kv[:, i, 0], kv[:, i, 1]) for i in range(kv.shape[1])]


@dataclass
class _LayerView:
    keys: torch.Tensor
    values: torch.Tensor


class StreamingCodecDecoder:
    """Decodes Mimi codes chunk by chunk; the concatenated output equals `codec.decode(all_codes)`.

    The decoder reads the codec's weight tensors when it is built (in-place updates show through;
    replacing a parameter object, or a weight-norm parametrization, needs a new decoder)."""

    def __init__(self, codec: MimiModel):
        if codec.decoder is None:
            raise ValueError("the codec has no decoder (decoder_config=None)")
        if codec.config.audio_channels != 1:
            raise NotImplementedError("streaming decodes mono codecs only")
        self.codec = codec
        self.frame_size = codec.config.frame_size
        self._plan = _Plan(codec)
        self.reset()

    def reset(self) -> None:
        """Forget the current stream; the next `decode` starts a new one."""
        self._carry: torch.Tensor | None = None  # [rows, carry_size]; None: a fresh stream (all zeros)
        self._kv = _KeyValues()

    def decode(self, codes: torch.LongTensor) -> torch.FloatTensor:
        """codes [B, K, n] (n >= 1 new frames) -> audio [B, n * frame_size] in the codec's dtype."""
        return decode_together([self], [codes])[0]


@torch.inference_mode()
def decode_together(decoders: list[StreamingCodecDecoder], codes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Advance several streams of one codec by one chunk each, in one batched pass per chunk length.

    codes[i] [B_i, K, n_i] -> audio [B_i, n_i * frame_size]; the audio and each decoder's state
    afterwards are those of `decoders[i].decode(codes[i])` (to float rounding)."""
    if len(decoders) != len(codes):
        raise ValueError(f"{len(decoders)} decoders but {len(codes)} code chunks")
    if len({id(d) for d in decoders}) != len(decoders):
        raise ValueError("a decoder appears twice: its chunks must be decoded in order")
    for c in codes:
        if c.dim() != 3 or c.shape[-1] < 1:
            raise ValueError(f"codes must be [batch, codebooks, frames >= 1], got {tuple(c.shape)}")
    if not decoders:
        return []
    codec = decoders[0].codec
    if any(d.codec is not codec for d in decoders):
        raise ValueError("decode_together needs decoders of one codec")
    for d, c in zip(decoders, codes, strict=True):
        if d._carry is not None and d._carry.shape[0] != c.shape[0]:
            raise ValueError(f"a stream of {d._carry.shape[0]} rows got codes for {c.shape[0]}")

    by_length: dict[int, list[int]] = {}
    for i, c in enumerate(codes):
        by_length.setdefault(c.shape[-1], []).append(i)
    audio: list[torch.Tensor | None] = [None] * len(decoders)
    for group in by_length.values():
        outs = _decode_group(
            decoders[0]._plan, codec, [decoders[i] for i in group], [codes[i] for i in group]
        )
        for i, out in zip(group, outs, strict=True):
            audio[i] = out
    return audio


def _decode_group(
    plan: _Plan, codec: MimiModel, decoders: list[StreamingCodecDecoder], codes: list[torch.Tensor]
) -> list[torch.Tensor]:
    device = plan.inv_freq.device
    sizes = [c.shape[0] for c in codes]
    single = len(decoders) == 1
    hidden = codec.quantizer.decode(codes[0].to(device) if single else torch.cat(codes).to(device))
    rows = _stack_carry(plan, decoders, sizes, hidden)

    if plan.upsample is not None:
        hidden = _conv_transpose(plan.upsample, hidden, rows)
    hidden = _transformer(plan, hidden.transpose(1, 2), decoders, sizes).transpose(1, 2)
    for op in plan.seanet:
        hidden = _run(op, hidden, rows)

    carry = torch.cat(rows.new_carry, dim=1) if rows.new_carry else rows.carry
    if single:
        decoders[0]._carry = carry
        return [hidden[:, 0]]
    # Each stream keeps its own copy, so an idle stream does not hold the whole batch's buffer.
    start = 0
    audio = []
    for d, n in zip(decoders, sizes, strict=True):
        d._carry = carry[start : start + n].clone()
        audio.append(hidden[start : start + n, 0])
        start += n
    return audio


def _stack_carry(
    plan: _Plan, decoders: list[StreamingCodecDecoder], sizes: list[int], hidden: torch.Tensor
) -> _Rows:
    if len(decoders) == 1 and decoders[0]._carry is not None:
        return _Rows(decoders[0]._carry, None)
    parts, fresh = [], []
    for d, n in zip(decoders, sizes, strict=True):
        is_fresh = d._carry is None
        fresh += [is_fresh] * n
        parts.append(hidden.new_zeros(n, plan.carry_size) if is_fresh else d._carry)
    carry = parts[0] if len(parts) == 1 else torch.cat(parts)
    flags = torch.tensor(fresh, device=hidden.device)[:, None, None] if any(fresh) else None
    return _Rows(carry, flags)


def _run(op, hidden: torch.Tensor, rows: _Rows) -> torch.Tensor:
    if isinstance(op, _Conv):
        return _conv(op, hidden, rows)
    if isinstance(op, _Elu):
        return F.elu(hidden, op.alpha)
    if isinstance(op, _ConvTranspose):
        return _conv_transpose(op, hidden, rows)
    if isinstance(op, _Residual):
        out = hidden
        for sub in op.block:
            out = _run(sub, out, rows)
        residual = hidden if op.shortcut is None else _conv(op.shortcut, hidden, rows)
        return residual + out
    if op is None:
        return hidden
    raise AssertionError(op)


def _conv(op: _Conv, hidden: torch.Tensor, rows: _Rows) -> torch.Tensor:
    if op.context:
        batch = hidden.shape[0]
        past = rows.carry[:, op.offset : op.offset + op.channels * op.context].view(
            batch, op.channels, op.context
        )
        if op.replicate and rows.fresh is not None:
            past = torch.where(rows.fresh, hidden[..., :1].expand_as(past), past)
        hidden = torch.cat([past, hidden], dim=-1)
        rows.new_carry.append(hidden[..., -op.context :].reshape(batch, -1))
    return F.conv1d(hidden, op.weight, op.bias, dilation=op.dilation, groups=op.groups)


def _conv_transpose(op: _ConvTranspose, hidden: torch.Tensor, rows: _Rows) -> torch.Tensor:
    if op.matrix is not None:
        return _upsample(op, hidden, rows)
    out = F.conv_transpose1d(hidden, op.weight, op.bias, stride=op.stride, groups=op.groups)
    if op.overlap == 0:
        return out
    batch = hidden.shape[0]
    out[..., : op.overlap] += rows.carry[:, op.offset : op.offset + op.channels * op.overlap].view(
        batch, op.channels, op.overlap
    )
    tail = out[..., -op.overlap :]
    # The bias is already in the next chunk's head, so the held tail must not carry it twice.
    tail = tail - op.bias[:, None] if op.bias is not None else tail
    rows.new_carry.append(tail.reshape(batch, -1))
    return out[..., : -op.overlap]


def _upsample(op: _ConvTranspose, hidden: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """A transposed conv with kernel 2 * stride as one matmul: input step t writes two blocks of
    `stride` samples, block t and block t + 1, so each output block is the first half of its own
    step's product plus the second half of the step before (the held tail, for the first block).
    Torch's CPU transposed conv for one row was a slow kernel; this is several times faster."""
    batch, _, steps = hidden.shape
    blocks = (hidden.transpose(1, 2) @ op.matrix).view(batch, steps, op.channels, 2, op.stride)
    head, tail = blocks[..., 0, :], blocks[..., 1, :]
    held = rows.carry[:, op.offset : op.offset + op.channels * op.stride].view(
        batch, 1, op.channels, op.stride
    )
    out = head + torch.cat([held, tail[:, :-1]], dim=1)
    if op.bias is not None:
        out = out + op.bias[:, None]
    rows.new_carry.append(tail[:, -1].reshape(batch, -1))
    return out.permute(0, 2, 1, 3).reshape(batch, op.channels, steps * op.stride)


def _transformer(
    plan: _Plan, hidden: torch.Tensor, decoders: list[StreamingCodecDecoder], sizes: list[int]
) -> torch.Tensor:
    """Mimi's decoder transformer over [B, T, C]; each stream row attends to its own past keys."""
    batch, steps, _ = hidden.shape
    device = hidden.device
    states = [d._kv for d in decoders]
    lengths = [s.length for s in states]
    longest = max(lengths)
    total = longest + steps

    # Row b's keys sit right-aligned in `total` slots: its past, then this chunk's; the rest is zero.
    keys_values = hidden.new_zeros(batch, len(plan.layers), 2, plan.kv_heads, total, plan.head_dim)
    start = 0
    for state, n in zip(states, sizes, strict=True):
        if state.keys_values is not None:
            keys_values[start : start + n, ..., longest - state.length : longest, :] = state.keys_values
        start += n

    def per_row(values: list[int]) -> torch.Tensor:
        return torch.tensor([v for v, n in zip(values, sizes, strict=True) for _ in range(n)], device=device)[
            :, None
        ]

    step_ids = torch.arange(steps, device=device)
    firsts = [s.steps for s in states]
    positions = step_ids[None] + (firsts[0] if len(set(firsts)) == 1 else per_row(firsts))
    cos, sin = _rotary(plan, positions, hidden.dtype)

    # Slot j holds the key `j - longest` steps after this chunk's first query.
    relative = torch.arange(total, device=device) - longest
    mask = relative <= step_ids[:, None]
    if plan.window is not None:
        mask &= relative > step_ids[:, None] - plan.window
    if len(set(lengths)) > 1:
        mask = (mask & (relative >= -per_row(lengths))[:, None, :])[:, None]

    for i, layer in enumerate(plan.layers):
        hidden = hidden + layer.attn_scale * _attention(
            plan, layer, hidden, cos, sin, mask, keys_values[:, i], longest
        )
        h = F.layer_norm(
            hidden, layer.norm2.normalized_shape, layer.norm2.weight, layer.norm2.bias, layer.norm2.eps
        )
        hidden = hidden + layer.mlp_scale * F.linear(layer.activation(F.linear(h, layer.fc1)), layer.fc2)

    keep = total if plan.window is None else plan.window - 1
    start = 0
    for state, length, n in zip(states, lengths, sizes, strict=True):
        kept = keys_values[start : start + n, ..., total - min(keep, length + steps) :, :]
        # Each stream keeps its own copy, so an idle stream does not hold the whole batch's buffer.
        state.keys_values = kept if len(states) == 1 else kept.clone()
        state.steps += steps
        start += n
    return hidden


def _rotary(plan: _Plan, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, head_dim] at each row's own positions, as `MimiRotaryEmbedding` computes them."""
    freqs = positions[..., None].float() * plan.inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * plan.rotary_scaling).to(dtype)[:, None], (emb.sin() * plan.rotary_scaling).to(dtype)[
        :, None
    ]


def _attention(
    plan: _Plan,
    layer: _Layer,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    keys_values: torch.Tensor,
    longest: int,
) -> torch.Tensor:
    """Self-attention of one layer; writes this chunk's keys/values into `keys_values` [B, 2, H, S, D]."""
    batch, steps, _ = hidden.shape
    h = F.layer_norm(
        hidden, layer.norm1.normalized_shape, layer.norm1.weight, layer.norm1.bias, layer.norm1.eps
    )
    q = F.linear(h, layer.q, layer.q_bias).view(batch, steps, plan.heads, plan.head_dim).transpose(1, 2)
    k = F.linear(h, layer.k, layer.k_bias).view(batch, steps, plan.kv_heads, plan.head_dim).transpose(1, 2)
    v = F.linear(h, layer.v, layer.v_bias).view(batch, steps, plan.kv_heads, plan.head_dim).transpose(1, 2)
    keys_values[:, 0, :, longest:] = k * cos + _rotate_half(k) * sin
    keys_values[:, 1, :, longest:] = v
    out = F.scaled_dot_product_attention(
        q * cos + _rotate_half(q) * sin,
        keys_values[:, 0],
        keys_values[:, 1],
        attn_mask=mask,
        scale=plan.scaling,
        enable_gqa=plan.kv_heads != plan.heads,
    )
    return F.linear(out.transpose(1, 2).reshape(batch, steps, -1), layer.o, layer.o_bias)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
