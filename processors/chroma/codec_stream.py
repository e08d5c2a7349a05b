"""Streaming decoder for transformers' `MimiModel`: codes frame by frame in, audio out as soon as it is final.

The one-shot `MimiModel.decode` is causal end to end, so a stream that carries each stateful layer's
state from call to call reproduces it exactly:
  - quantizer: frame-wise, stateless;
  - transposed convolutions (`upsample` and the SEANet upsamplers): the overlapping right tail of the
    output (`kernel - stride` samples) is held back and added to the head of the next chunk's output;
  - decoder transformer: a `DynamicCache` built from the decoder config, i.e. sliding-window layers
    keeping the last `sliding_window - 1` keys/values, with positions continuing from the cache length;
  - causal `MimiConv1d`s: transformers' `MimiConv1dPaddingCache` keeps each conv's last
    `padding_total` input samples as its left context;
  - ELU / identity: pointwise.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, MimiModel
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConv1dPaddingCache,
    MimiConvTranspose1d,
    MimiResnetBlock,
)

_POINTWISE = (nn.ELU, nn.Identity)


class StreamingCodecDecoder:
    """Decodes Mimi codes chunk by chunk; the concatenated output equals `codec.decode(all_codes)`."""

    def __init__(self, codec: MimiModel):
        if codec.decoder is None:
            raise ValueError("the codec has no decoder (decoder_config=None)")
        if codec.config.audio_channels != 1:
            raise NotImplementedError("streaming decodes mono codecs only")
        self.codec = codec
        self.frame_size = codec.config.frame_size
        decoder = codec.decoder
        convs = [m for m in decoder.decoder_seanet.modules() if isinstance(m, MimiConv1d)]
        self._convs = {conv: i for i, conv in enumerate(convs)}  # index into the padding cache
        for conv in self._convs:
            # A strided causal conv pads its last partial window on the right, which a stream cannot know yet.
            if not conv.causal or conv.conv.stride[0] != 1:
                raise NotImplementedError("streaming needs causal stride-1 SEANet convolutions")
        for conv in decoder.modules():
            # A left trim (trim_right_ratio < 1) would need look-ahead into the next chunk.
            if isinstance(conv, MimiConvTranspose1d) and conv.padding_left != 0:
                raise NotImplementedError("streaming needs trim_right_ratio == 1")
        self.reset()

    def reset(self) -> None:
        """Forget the current stream; the next `decode` starts a new one."""
        convs = list(self._convs)
        self._padding = MimiConv1dPaddingCache(
            num_layers=len(convs),
            per_layer_padding=[int(c.padding_total) for c in convs],
            per_layer_padding_mode=[c.pad_mode for c in convs],
            per_layer_in_channels=[c.in_channels for c in convs],
        )
        self._kv = DynamicCache(config=self.codec.decoder.decoder_transformer.config)
        self._tails: dict[nn.Module, torch.Tensor] = {}

    @torch.inference_mode()
    def decode(self, codes: torch.LongTensor) -> torch.FloatTensor:
        """codes [B, K, n] (n >= 1 new frames) -> audio [B, n * frame_size] in the codec's dtype."""
        if codes.dim() != 3 or codes.shape[-1] < 1:
            raise ValueError(f"codes must be [batch, codebooks, frames >= 1], got {tuple(codes.shape)}")
        decoder = self.codec.decoder
        device = next(self.codec.parameters()).device
        hidden = self.codec.quantizer.decode(codes.to(device))
        if decoder.upsample is not None:
            hidden = self._conv_transpose(decoder.upsample, hidden)

        steps = hidden.shape[-1]
        start = self._kv.get_seq_length()
        position_ids = torch.arange(start, start + steps, device=device)[None]
        hidden = decoder.decoder_transformer(
            hidden.transpose(1, 2), cache=self._kv, position_ids=position_ids, use_cache=True
        ).last_hidden_state.transpose(1, 2)

        for layer in decoder.decoder_seanet.layers:
            hidden = self._run(layer, hidden)
        return hidden[:, 0]

    def _run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, MimiConv1d):
            past = self._padding.update(hidden, self._convs[layer])
            return layer.conv(torch.cat([past, hidden], dim=-1))
        if isinstance(layer, MimiConvTranspose1d):
            return self._conv_transpose(layer, hidden)
        if isinstance(layer, MimiResnetBlock):
            out = hidden
            for sub in layer.block:
                out = self._run(sub, out)
            return self._run(layer.shortcut, hidden) + out
        if isinstance(layer, _POINTWISE):
            return layer(hidden)
        raise NotImplementedError(f"no streaming rule for {type(layer).__name__}")

    def _conv_transpose(self, layer: MimiConvTranspose1d, hidden: torch.Tensor) -> torch.Tensor:
        out = layer.conv(hidden)
        overlap = out.shape[-1] - hidden.shape[-1] * layer.conv.stride[0]
        if overlap == 0:
            return out
        tail = self._tails.get(layer)
        if tail is not None:
            out[..., :overlap] += tail
        tail = out[..., -overlap:]
        bias = layer.conv.bias
        # The bias is already in the next chunk's head, so the held tail must not carry it twice.
        self._tails[layer] = tail - bias[:, None] if bias is not None else tail.clone()
        return out[..., :-overlap]
