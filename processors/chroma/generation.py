"""One response, step by step: the thinker's token stream, the voice prompt, the 1:2 schedule.

Step 0 feeds the backbone [voice prompt] + (thinker hidden, token embedding) of the first
text token. Step n >= 1 feeds the previous frame's summed code vector, and on even steps
one more thinker pair: text token t enters at step 2t. A frame whose levels 0..n-2 are all
`codebook_eos_token_id` ends the response; an all-eos frame is not audio.

Synchronous maths only; `scheduler.py` runs these steps on the model's scheduler thread.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .modeling import ChromaModel


@dataclass
class ThinkerToken:
    token_id: int
    hidden: torch.Tensor  # [1, H]: the final-norm state whose lm_head picked the token
    embedding: torch.Tensor  # [1, H]: the thinker's embedding of the token


class TokenFilter:
    """Sees each thinker token before the backbone does; returns the tokens to speak now.

    Return [] to hold a token back (and release it later) or to drop it. The default
    speaks everything; the tool-call filter (tools.py) holds `<tool_call>` spans here."""

    def push(self, token: ThinkerToken) -> list[ThinkerToken]:
        return [token]

    def finish(self) -> list[ThinkerToken]:
        return []

    def should_pause(self) -> bool:
        """True once after the thinker wrote something the reply must wait on (a complete tool call)."""
        return False


def truncate_cache(cache: DynamicCache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class ThinkerStream:
    """The thinker's greedy reply, decoded up to `lookahead` tokens ahead of the backbone."""

    def __init__(
        self,
        model: ChromaModel,
        cache: DynamicCache,
        next_position: int,
        first_hidden: torch.Tensor,
        first_token: torch.Tensor,
        lookahead: int = 3,
        token_filter: TokenFilter | None = None,
        max_tokens: int = 1024,
    ):
        self.model = model
        self.cache = cache
        self.next_position = next_position
        self.lookahead = max(0, lookahead)
        self.filter = token_filter or TokenFilter()
        self.max_tokens = max_tokens
        self.raw_tokens: list[int] = []  # everything the thinker produced, in order
        self.paused_at_call = False  # the text ended at a tool call: the answer needs its result
        self._ready: deque[ThinkerToken] = deque()
        self._ended = False
        self._accept(first_hidden, first_token)

    def _accept(self, hidden: torch.Tensor, token: torch.Tensor) -> None:
        token_id = int(token.item())
        self.raw_tokens.append(token_id)
        pair = ThinkerToken(token_id, hidden, self.model.embed_text(token.view(1)).view(1, -1))
        self._ready.extend(self.filter.push(pair))
        if self.filter.should_pause():
            # Stop decoding here: what the thinker says next depends on the tool's result, which it
            # reads in the next reply. The backbone speaks what came before the call, then ends.
            self.paused_at_call = True
        if self.paused_at_call or token_id == self.model.config.im_end_token_id or len(self.raw_tokens) >= self.max_tokens:
            self._ended = True
            self._ready.extend(self.filter.finish())

    def _decode_one(self) -> None:
        last = torch.tensor([[self.raw_tokens[-1]]], device=self.model.device)
        positions = torch.full((3, 1, 1), self.next_position, dtype=torch.long)
        hidden, token = self.model.thinker_forward(last, positions, self.cache)
        self.next_position += 1
        self._accept(hidden, token)

    def wants_decode(self) -> bool:
        """True while `next_token()` would still decode before returning a token."""
        return not self._ended and len(self._ready) <= self.lookahead

    def next_token(self) -> ThinkerToken | None:
        """The next token for the backbone, or None once the reply's text is over."""
        while self.wants_decode():
            self._decode_one()
        return self._ready.popleft() if self._ready else None


@dataclass
class VoicePrompt:
    """The backbone prefix for one voice: computed once, copied into every response."""

    length: int
    mask: torch.Tensor | None  # [1, length] when some prompt frames are masked out
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]
    frames: int

    def fresh_cache(self) -> DynamicCache:
        return DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in self.keys_values])


def voice_prompt_embeds(
    model: ChromaModel,
    text_ids: torch.Tensor,
    audio_24k: torch.Tensor,
    cutoff: int | None = None,
    codes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """[text_start, transcript, text_end, audio frames, zero] as backbone inputs [1, P, H].

    `codes` [F, n]: the reference already encoded (a voice's stored codes); else it is encoded here."""
    cfg = model.config
    if codes is None:
        codes = model.encode_audio(audio_24k.reshape(1, 1, -1))  # [1, F, n]
    else:
        codes = codes.reshape(1, -1, cfg.audio_num_codebooks).to(model.device, torch.long)
    frames = model.backbone.frame_vectors(codes)  # [1, F, H]
    ids = torch.tensor([[cfg.text_start_token_id, *text_ids.reshape(-1).tolist(), cfg.text_end_token_id]])
    text = model.embed_text(ids.to(model.device))
    zero = torch.zeros(1, 1, frames.shape[-1], device=model.device, dtype=frames.dtype)
    embeds = torch.cat([text.to(frames.dtype), frames, zero], dim=1)
    mask = None
    if cutoff is not None:
        keep = math.ceil(cutoff / cfg.audio_frame_freq)
        if keep < frames.shape[1]:
            mask = torch.ones(1, embeds.shape[1], dtype=torch.long, device=model.device)
            mask[0, text.shape[1] + keep : text.shape[1] + frames.shape[1]] = 0
    return embeds, mask, frames.shape[1]


@torch.inference_mode()
def build_voice_prompt(
    model: ChromaModel,
    text_ids: torch.Tensor,
    audio_24k: torch.Tensor | None,
    cutoff: int | None = None,
    codes: torch.Tensor | None = None,
) -> VoicePrompt:
    embeds, mask, frames = voice_prompt_embeds(model, text_ids, audio_24k, cutoff, codes)
    cache = DynamicCache()
    model.backbone_forward(embeds, cache, mask)
    kv = [(k, v) for k, v, *_ in cache]
    return VoicePrompt(length=embeds.shape[1], mask=mask, keys_values=kv, frames=frames)


@dataclass
class Sampling:
    do_sample: bool = False
    top_k: int = 50
    temperature: float = 0.9
    seed: int | None = None


@dataclass
class StepTrace:
    """What entered the backbone at one step (the 1:2 schedule, observable)."""

    step: int
    frame_input: bool
    text_token: int | None
    codes: list[int] = field(default_factory=list)


class ResponseSteps:
    """Generates one response's frames, one backbone step per call to `next_frame`."""

    def __init__(
        self,
        model: ChromaModel,
        voice: VoicePrompt,
        thinker: ThinkerStream,
        max_frames: int = 750,
        sampling: Sampling | None = None,
        cache: DynamicCache | None = None,
    ):
        self.model = model
        self.voice = voice
        self.thinker = thinker
        self.max_frames = max_frames
        self.sampling = sampling or Sampling()
        self.cache = cache  # transformers' path only; made from the voice prefix on first use
        self.step = 0
        self.done = False
        self.entered: list[tuple[int, int]] = []  # (step, text token id) in backbone order
        self.trace: list[StepTrace] = []
        self._previous: torch.Tensor | None = None
        self._text_over = False
        self._pending_token: int | None = None
        self._generator = None
        if self.sampling.do_sample and self.sampling.seed is not None:
            self._generator = torch.Generator(device=model.device).manual_seed(self.sampling.seed)

    @torch.inference_mode()
    def next_frame(self) -> torch.Tensor | None:
        """The next audio frame's codes [n], or None when the response is over (transformers' modules)."""
        if self.done:
            return None
        parts = self.frame_inputs()
        if parts is None:
            return None
        if self.cache is None:
            self.cache = self.voice.fresh_cache()
        mask = None
        if self.voice.mask is not None:
            total = self.cache.get_seq_length() + parts.shape[0]
            mask = torch.ones(1, total, dtype=torch.long, device=self.model.device)
            mask[:, : self.voice.length] = self.voice.mask
        hidden = self.model.backbone_forward(parts.unsqueeze(0), self.cache, mask)
        s = self.sampling
        codes = self.model.decode_frame(hidden, s.do_sample, s.top_k, s.temperature, self._generator)[0]
        return self.accept(codes)

    def wants_text(self) -> bool:
        """True when this step's `frame_inputs()` will ask the thinker for a token."""
        return not self.done and self.step % 2 == 0 and not self._text_over

    def frame_inputs(self) -> torch.Tensor | None:
        """This step's new backbone inputs [1..3, H] (the 1:2 schedule), or None if the reply is over."""
        parts, token_id = [], None
        if self._previous is not None:
            parts.append(self.model.backbone.frame_vectors(self._previous.view(1, 1, -1))[0])
        if self.step % 2 == 0 and not self._text_over:
            token = self.thinker.next_token()
            if token is None:
                self._text_over = True
            else:
                token_id = token.token_id
                parts += [token.hidden.to(self.model.dtype), token.embedding.to(self.model.dtype)]
                self.entered.append((self.step, token_id))
        if not parts:  # only possible at step 0 if the filter held every token
            self.done = True
            return None
        self._pending_token = token_id
        return torch.cat(parts, dim=0)

    def accept(self, codes: torch.Tensor) -> torch.Tensor | None:
        """Take the frame the step produced for `frame_inputs()`; returns it, or None if it is not audio."""
        self.trace.append(StepTrace(self.step, self._previous is not None, self._pending_token, codes.tolist()))
        self.step += 1
        self._previous = codes
        is_eos = (codes == self.model.config.codebook_eos_token_id).tolist()
        if all(is_eos[:-1]) or self.step >= self.max_frames:
            self.done = True
        return None if all(is_eos) else codes

    @property
    def pick(self) -> tuple[bool, int, float, torch.Generator | None]:
        s = self.sampling
        return s.do_sample, s.top_k, s.temperature, self._generator

    def text_before(self, frames: int) -> list[int]:
        """Text tokens consumed by the first `frames` frames (token entering at step s belongs to frame s)."""
        return [tok for step, tok in self.entered if step < frames]


@torch.inference_mode()
def prefill_thinker(
    model: ChromaModel,
    input_ids: torch.Tensor,
    cache: DynamicCache,
    position_offset: int = 0,
    input_features: torch.Tensor | None = None,
    feature_attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prefill a segment of the chat after the cached part; returns (hidden, next token, next position)."""
    lengths = None if feature_attention_mask is None else feature_attention_mask.sum(-1)
    positions = model.thinker_positions(input_ids, lengths) + position_offset
    hidden, token = model.thinker_forward(input_ids, positions, cache, input_features, feature_attention_mask)
    return hidden, token, int(positions.max().item()) + 1


@torch.inference_mode()
def generate_codes(
    model: ChromaModel, inputs: dict, max_new_frames: int, do_sample: bool = False, lookahead: int = 3,
    top_k: int = 50, temperature: float = 0.9,
) -> torch.LongTensor:
    """The conformance seam: the released processor's tensors in, codes [B, T, n] out.

    Items of a batch run one after the other; shorter replies are padded with
    `codebook_pad_token_id`, as the reference pads finished sequences."""
    required = ("thinker_input_ids", "thinker_input_features", "thinker_feature_attention_mask",
                "input_ids", "input_values")
    missing = [k for k in required if k not in inputs]
    if missing:
        raise KeyError(f"generate_codes: inputs lack {', '.join(missing)} (the released processor's tensors)")
    cfg = model.config
    batch = inputs["thinker_input_ids"].shape[0]
    replies = []
    for b in range(batch):
        ids = inputs["thinker_input_ids"][b : b + 1]
        if "thinker_attention_mask" in inputs:
            ids = ids[:, inputs["thinker_attention_mask"][b].bool()]
        feat_mask = inputs["thinker_feature_attention_mask"][b : b + 1]
        features = inputs["thinker_input_features"][b : b + 1]
        text = inputs["input_ids"][b]
        if "attention_mask" in inputs:
            text = text[inputs["attention_mask"][b].bool()]
        cutoff = int(inputs["input_values_cutoffs"][b]) if "input_values_cutoffs" in inputs else None
        voice = build_voice_prompt(model, text, inputs["input_values"][b], cutoff)
        thinker_cache = DynamicCache()
        hidden, token, next_pos = prefill_thinker(model, ids, thinker_cache, 0, features, feat_mask)
        stream = ThinkerStream(model, thinker_cache, next_pos, hidden, token, lookahead)
        steps = ResponseSteps(model, voice, stream, max_new_frames, Sampling(do_sample, top_k, temperature))
        frames = []
        while not steps.done:
            codes = steps.next_frame()
            if codes is not None:
                frames.append(codes)
        replies.append(torch.stack(frames) if frames else torch.empty(0, cfg.audio_num_codebooks, dtype=torch.long))
    longest = max(r.shape[0] for r in replies)
    out = torch.full((batch, longest, cfg.audio_num_codebooks), cfg.codebook_pad_token_id, dtype=torch.long)
    for b, r in enumerate(replies):
        out[b, : r.shape[0]] = r.cpu()
    return out


def codec_codes(model: ChromaModel, codes: torch.Tensor) -> torch.Tensor:
    """The audio vocabulary has specials above the codec's codebook (pad 2050 in the released
    model); the codec cannot index them, so they are played as code 0."""
    return codes.masked_fill(codes >= model.config.codec_config.codebook_size, 0)


@torch.inference_mode()
def decode_codes(model: ChromaModel, codes: torch.Tensor) -> torch.Tensor:
    """codes [B, T, n] -> 24 kHz audio [B, T * frame]; pad frames become silence."""
    cfg = model.config
    pad = codes == cfg.codebook_pad_token_id
    clean = codec_codes(model, codes).to(model.device)
    audio = model.codec_model.decode(clean.transpose(1, 2)).audio_values[:, 0].float()
    frame_is_pad = pad.all(-1)  # [B, T]
    sample_is_pad = frame_is_pad.repeat_interleave(cfg.audio_frame_freq, dim=1).to(audio.device)
    audio = audio[:, : sample_is_pad.shape[1]]
    return audio.masked_fill(sample_is_pad[:, : audio.shape[1]], 0.0)


