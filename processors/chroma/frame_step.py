"""One audio frame for every row of a batch: one backbone forward, then the depth decoder's levels.

Row b brings 1 to 3 new backbone inputs (the previous frame's code vector and, on even steps,
the thinker's hidden state and token embedding), its own cache length, its own voice-prompt
mask and its own sampling. Rows are padded to the widest input; a padded position's key is
written past the row's length, where nothing attends to it and the row's next step overwrites it.
The depth decoder sees the same positions in every row (0..n-1 within the frame), so it needs no
mask at all.

Maths only: `scheduler.py` decides which rows run and when.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from loguru import logger

from .llama_step import KVPool, LlamaStack, ScratchKV
from .modeling import ChromaModel, sample_top_k


@dataclass
class RowPick:
    """How one row chooses its codes: greedy, or top-k sampling with its own generator."""

    do_sample: bool = False
    top_k: int = 50
    temperature: float = 0.9
    generator: torch.Generator | None = None


GREEDY = RowPick()


class FrameStep:
    """The batched frame step over a pool of `rows` backbone caches of `capacity` positions each."""

    def __init__(self, model: ChromaModel, rows: int, capacity: int | None = None, cuda_graphs: bool | None = None):
        self.model = model
        self.backbone = LlamaStack(model.backbone.model)
        self.decoder = LlamaStack(model.decoder.model)
        self.codebooks = model.config.audio_num_codebooks
        self.capacity = capacity or self.backbone.max_positions
        self.device, self.dtype = model.device, model.dtype
        self.pool = KVPool(self.backbone, rows, self.capacity, self.device, self.dtype)
        # what a row with no room this tick feeds the backbone (its output is discarded)
        self.idle_input = torch.zeros(1, self.backbone.hidden, device=self.device, dtype=self.dtype)
        self.scratch = ScratchKV(self.decoder, rows, self.codebooks, self.device, self.dtype)
        positions = torch.arange(self.codebooks, device=self.device)[None]
        cos, sin = self.decoder.rotary(positions, self.dtype)
        self._decoder_rope = (cos, sin)  # [1, n, 1, d]: positions 0..n-1, the same for every frame
        self._levels = model.decoder.codebook_head.weight.detach()  # [n-1, H, V]
        self._table = model.decoder.audio_embedding
        self._projection = model.decoder.projection.weight.detach()
        # The decoder's input for code c of codebook k is projection(table[k * vocab + c]): computed once
        # for the whole table (8 x 2051 rows), a level's input is then one lookup instead of three ops.
        self._vocab = model.config.audio_vocab_size
        self._projected_codes = F.linear(self._table.embed_audio_tokens.weight.detach(), self._projection)
        self._head0 = model.backbone.codebook0_head.weight.detach()
        # On CUDA the depth decoder's levels are many small kernels: replaying them as one captured
        # graph per batch-size bucket removes the launch overhead. Greedy rows only (sampling draws
        # from per-row generators on the host).
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    @property
    def rows(self) -> int:
        return self.pool.rows

    def grow(self, rows: int) -> None:
        """Room for `rows` rows, keeping the caches of those there now."""
        if rows <= self.pool.rows:
            return
        old = self.pool
        self.pool = KVPool(self.backbone, rows, self.capacity, self.device, self.dtype)
        for layer in range(old.keys.__len__()):
            self.pool.keys[layer][: old.rows] = old.keys[layer]
            self.pool.values[layer][: old.rows] = old.values[layer]
        self.scratch = ScratchKV(self.decoder, rows, self.codebooks, self.device, self.dtype)
        self._graphs.clear()  # they captured the old scratch buffers

    # -- backbone -------------------------------------------------------------------

    def backbone_step(
        self, inputs: list[torch.Tensor], lengths: list[int], prompt_masks: list[torch.Tensor | None]
    ) -> torch.Tensor:
        """inputs[b] [n_b, H] entering rows 0..B-1 at positions lengths[b]..; returns each row's
        final-norm hidden state at its last input [B, H]."""
        batch = len(inputs)
        width = max(x.shape[0] for x in inputs)
        x = torch.zeros(batch, width, self.backbone.hidden, device=self.device, dtype=self.dtype)
        for b, rows in enumerate(inputs):
            x[b, : rows.shape[0]] = rows
        counts = torch.tensor([r.shape[0] for r in inputs], device=self.device)
        starts = torch.tensor(lengths, device=self.device)
        positions = starts[:, None] + torch.arange(width, device=self.device)
        span = max(n + r.shape[0] for n, r in zip(lengths, inputs, strict=True))
        self.pool.prepare(starts, width, span)
        mask = self._backbone_mask(positions, span, prompt_masks)
        hidden = self.backbone.forward(x, self.backbone.rotary(positions, self.dtype), self.pool, mask)
        return hidden[torch.arange(batch, device=self.device), counts - 1]

    def _backbone_mask(
        self, positions: torch.Tensor, span: int, prompt_masks: list[torch.Tensor | None]
    ) -> torch.Tensor | None:
        batch, width = positions.shape
        if batch == 1 and width == 1 and prompt_masks[0] is None:
            return None  # one new position that sees everything before it
        keys = torch.arange(span, device=self.device)
        mask = keys[None, None, :] <= positions[:, :, None]  # [B, q, span]: causal, per row
        if any(m is not None for m in prompt_masks):
            keep = torch.ones(batch, span, dtype=torch.bool, device=self.device)
            for b, m in enumerate(prompt_masks):
                if m is not None:
                    keep[b, : m.shape[-1]] = m.reshape(-1).bool()
            mask = mask & keep[:, None, :]
        return mask[:, None]

    # -- depth decoder ----------------------------------------------------------------

    def decode(self, hidden: torch.Tensor, picks: list[RowPick]) -> torch.Tensor:
        """Every row's frame [B, n] from its backbone hidden state [B, H]: level 0 from the
        backbone's head, levels 1..n-1 from the depth decoder."""
        if self.cuda_graphs and self.device.type == "cuda" and not any(p.do_sample for p in picks):
            replayed = self._replay(hidden)
            if replayed is not None:
                return replayed
        return self._decode(hidden, picks)

    def _replay(self, hidden: torch.Tensor) -> torch.Tensor | None:
        batch = hidden.shape[0]
        bucket = 1 << (batch - 1).bit_length()  # 1, 2, 4, 8, ...: few graphs, little padding
        if bucket > self.scratch.rows:
            return None
        if bucket not in self._graphs:
            try:
                self._graphs[bucket] = self._capture(bucket)
            except Exception as exc:  # a driver or kernel that cannot be captured: run eagerly
                logger.warning(f"CUDA graph capture of the depth decoder failed ({exc}); running it eagerly")
                self.cuda_graphs = False
                return None
        graph, static_in, static_out = self._graphs[bucket]
        static_in[:batch].copy_(hidden)
        graph.replay()
        return static_out[:batch].clone()

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = torch.zeros(bucket, self.backbone.hidden, device=self.device, dtype=self.dtype)
        greedy = [GREEDY] * bucket
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the graph, as capture requires
            for _ in range(2):
                self._decode(static_in, greedy)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._decode(static_in, greedy)
        return graph, static_in, static_out

    def _decode(self, hidden: torch.Tensor, picks: list[RowPick]) -> torch.Tensor:
        batch = hidden.shape[0]
        codes = [self._pick(F.linear(hidden, self._head0), picks)]
        first = torch.stack([hidden, self._table.rows(codes[0][:, None])[:, 0]], dim=1)
        step_in = F.linear(first, self._projection)
        self.scratch.reset(batch)
        cos, sin = self._decoder_rope
        for level in range(1, self.codebooks):
            start = self.scratch.length
            end = start + step_in.shape[1]
            rope = (cos[:, start:end], sin[:, start:end])
            out = self.decoder.forward(step_in, rope, self.scratch, None, is_causal=step_in.shape[1] > 1)
            code = self._pick(out[:, -1] @ self._levels[level - 1], picks)
            codes.append(code)
            if level < self.codebooks - 1:
                step_in = self._projected_codes[code + level * self._vocab][:, None]
        return torch.stack(codes, dim=-1)

    @staticmethod
    def _pick(logits: torch.Tensor, picks: list[RowPick]) -> torch.Tensor:
        codes = logits.argmax(dim=-1)
        for b, pick in enumerate(picks):
            if pick.do_sample:
                codes[b] = sample_top_k(logits[b : b + 1], pick.top_k, pick.temperature, pick.generator)[0]
        return codes

    def step(
        self,
        inputs: list[torch.Tensor],
        lengths: list[int],
        prompt_masks: list[torch.Tensor | None],
        picks: list[RowPick],
    ) -> torch.Tensor:
        """One frame for rows 0..B-1: codes [B, n]."""
        return self.decode(self.backbone_step(inputs, lengths, prompt_masks), picks)
