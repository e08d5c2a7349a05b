"""Codec decode micro-benchmark: N calls' next chunks decoded one by one vs in one `decode_together`.

    .venv/bin/python -m bench.codec_batch                      # tiny preset, 1, 4, 16 calls
    .venv/bin/python -m bench.codec_batch --calls 1,8 --threads 1 --ticks 200

Each call's decoder is warmed with a different number of chunks first (0 up to past the sliding
window), so the rows' key/value lengths and positions differ as they do in the engine. A tick decodes
one chunk (--frames, 2 by default) for every call; the figures are medians over --ticks ticks, per call
and per frame. Not a test: it prints a Markdown table and never fails.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from processors.chroma.checkpoint import load_model
from processors.chroma.codec_stream import StreamingCodecDecoder, decode_together


def _decoders(codec, calls: int, frames: int, window_chunks: int) -> list[StreamingCodecDecoder]:
    decoders = []
    for i in range(calls):
        decoder = StreamingCodecDecoder(codec)
        warm = (i * (window_chunks + 8)) // max(calls - 1, 1)  # 0 .. past the window
        for _ in range(warm):
            decoder.decode(_chunk(codec, frames))
        decoders.append(decoder)
    return decoders


def _chunk(codec, frames: int) -> torch.Tensor:
    return torch.randint(0, codec.config.codebook_size, (1, codec.config.num_quantizers, frames))


def _median_ms(runs: list, ticks: int) -> list[float]:
    """Median ms of each run; the runs take turns tick by tick, so load from other processes hits all alike."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(ticks):
        for run, spent in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) * 1e3 for spent in times]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--calls", default="1,4,16")
    parser.add_argument("--frames", type=int, default=2, help="frames per chunk")
    parser.add_argument("--ticks", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    codec = load_model(args.model, device="cpu").codec_model
    window = codec.config.sliding_window or 0
    window_chunks = window // codec.config.latent_stride // args.frames
    print(
        f"{args.model}, {torch.get_num_threads()} threads, {args.frames} frames a chunk, median of {args.ticks} ticks\n"
    )
    print(
        "| calls | alone ms/tick | together ms/tick | alone ms/call/frame | together ms/call/frame | speed-up |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for calls in (int(c) for c in args.calls.split(",")):
        decoders = _decoders(codec, calls, args.frames, window_chunks)
        codes = [_chunk(codec, args.frames) for _ in decoders]

        def alone(decoders=decoders, codes=codes):
            for decoder, chunk in zip(decoders, codes, strict=True):
                decoder.decode(chunk)

        def together(decoders=decoders, codes=codes):
            decode_together(decoders, codes)

        for _ in range(5):
            alone(), together()
        alone_ms, together_ms = _median_ms([alone, together], args.ticks)
        per = calls * args.frames
        print(
            f"| {calls} | {alone_ms:.2f} | {together_ms:.2f} | {alone_ms / per:.3f} | {together_ms / per:.3f} "
            f"| {alone_ms / together_ms:.1f}x |"
        )


if __name__ == "__main__":
    main()
