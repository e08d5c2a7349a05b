"""Voice benchmark: time to first audio with the voice prefix cached vs. built for every response.

    .venv/bin/python -m bench.voices                              # tiny preset; references of 3, 10, 20 s
    .venv/bin/python -m bench.voices --seconds 3,10,20,30 --repeats 9 --json out.json

Each reference length is made into a library voice (`VoiceLibrary.add`: checked, trimmed, normalised,
stored) in a temporary folder. Then, per length and on one model load:

- **cached**: every reply is a new call's first reply whose prefix comes from the process-wide cache
  (built once from the voice's stored codes), as the runtime does;
- **per response**: the reference's way, the recording encoded by the codec and prefilled into the
  backbone inside every reply (`reuse_voice_prompt=False`);
- the one-off costs behind the cache: encoding the recording (once per model, then stored beside the
  voice), and building the prefix from stored codes (once per process).

The two reply kinds alternate within each repeat, so drift on a shared machine hits both alike;
figures are medians. A benchmark, not a test: it never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.engine import DTYPES, Clock, make_audio, stream_reply
from processors.chroma.checkpoint import default_device, default_dtype, load_model
from processors.chroma.config import LISTEN_RATE, SAMPLE_RATE
from processors.chroma.generation import build_voice_prompt
from processors.chroma.session import SpeakingVoice, _voice_cache
from voices.library import VoiceLibrary
from voices.validate import write_reference

SYSTEM_PROMPT = "You are a helpful voice agent. Answer briefly."
WORDS = "thanks for calling the support line today how can I help you with your order".split()


def transcript_for(seconds: float) -> str:
    """Filler words at an everyday speaking rate (about 2.5 words a second) for a synthetic reference."""
    count = max(3, round(2.5 * seconds))
    return " ".join(WORDS[i % len(WORDS)] for i in range(count)) + "."


def make_voices(folder: Path, lengths: list[float]) -> dict[float, object]:
    library = VoiceLibrary(folder / "library")
    voices = {}
    for i, seconds in enumerate(lengths):
        recording = folder / f"reference-{seconds:g}s.wav"
        write_reference(recording, make_audio(seconds, SAMPLE_RATE, seed=40 + i))
        voices[seconds] = library.add(
            f"bench-{i}", audio=recording, transcript=transcript_for(seconds), consent_by="no one: synthetic test tone",
            consent_use="benchmark", synthetic=True,
        )
    return voices


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def measure(model, voice, user, clock: Clock, repeats: int, frames: int) -> dict:
    def ttfa(reuse: bool) -> float:
        session = model.new_session(voice, SYSTEM_PROMPT, max_frames=frames, reuse_voice_prompt=reuse)
        return asyncio.run(stream_reply(session, user, clock, first_only=True))["ttfa_s"]

    ttfa(True), ttfa(False)  # warm-up; the first builds the cached prefix
    cached, per_response = [], []
    for _ in range(repeats):
        cached.append(ttfa(True))
        per_response.append(ttfa(False))

    speaking = SpeakingVoice.of(voice)
    ids = torch.tensor(model.tokenizer.encode(voice.transcript), dtype=torch.long)
    encode, from_codes = [], []
    for _ in range(repeats):
        with torch.inference_mode():
            t0 = clock.now()
            codes = model.encode_audio(torch.from_numpy(voice.audio).reshape(1, 1, -1))[0]
            t1 = clock.now()
            prompt = build_voice_prompt(model, ids, None, codes=codes)
            t2 = clock.now()
        encode.append(t1 - t0)
        from_codes.append(t2 - t1)
    assert _voice_cache(model).get(model, model.tokenizer, speaking).length == prompt.length
    return {
        "seconds": voice.seconds,
        "prompt_positions": prompt.length,
        "ttfa_cached_ms": median_ms(cached),
        "ttfa_per_response_ms": median_ms(per_response),
        "encode_ms": median_ms(encode),
        "prefix_from_codes_ms": median_ms(from_codes),
    }


def table(rows: dict[float, dict]) -> str:
    lines = [
        "| reference | prompt positions | time to first audio, prefix cached | built per response (reference) "
        "| saved | encode once per model | prefix from stored codes, once per process |",
        "|---|---|---|---|---|---|---|",
    ]
    for asked, r in rows.items():
        saved = r["ttfa_per_response_ms"] - r["ttfa_cached_ms"]
        lines.append(
            f"| {asked:g} s ({r['seconds']:.2f} s stored) | {r['prompt_positions']} | {r['ttfa_cached_ms']:.1f} ms "
            f"| {r['ttfa_per_response_ms']:.1f} ms | {saved:.1f} ms ({r['ttfa_per_response_ms'] / r['ttfa_cached_ms']:.2f}x) "
            f"| {r['encode_ms']:.1f} ms | {r['prefix_from_codes_ms']:.1f} ms |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.voices", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", default="3,10,20", help="reference lengths in seconds, comma-separated (default: 3,10,20)")
    p.add_argument("--repeats", type=int, default=7, help="replies per kind and length; medians reported (default: 7)")
    p.add_argument("--frames", type=int, default=8, help="reply cap in frames; only the first chunk is timed (default: 8)")
    p.add_argument("--user-seconds", type=float, default=2.0, help="the caller's turn length (default: 2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--model", default="tiny", help="'tiny' (default), a checkpoint folder or a Hugging Face id")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    try:
        args.lengths = [float(s) for s in args.seconds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seconds {args.seconds!r}: expected numbers separated by commas, such as 3,10,20")
    if not args.lengths or any(not 3 <= s <= 30 for s in args.lengths):
        p.error(f"--seconds {args.seconds!r}: each length must be from 3 to 30 s (what a voice accepts)")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    model = load_model(args.model, device=device, dtype=dtype)
    clock = Clock(model.device)
    user = make_audio(args.user_seconds, LISTEN_RATE, seed=2)
    started = time.perf_counter()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-voices-") as folder:
        voices = make_voices(Path(folder), args.lengths)
        for seconds, voice in voices.items():
            print(f"  .. {seconds:g} s reference", file=sys.stderr, flush=True)
            rows[seconds] = measure(model, voice, user, clock, args.repeats, args.frames)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"# Voice prefix benchmark: {args.model}\n")
    print(f"- model: {args.model}{' (random miniature: timings only)' if model.config.is_tiny else ''}")
    print(f"- device: {device}{gpu}; dtype: {str(dtype).removeprefix('torch.')}; torch {torch.__version__} "
          f"({torch.get_num_threads()} CPU threads); python {platform.python_version()}")
    print(f"- {args.repeats} repeats per figure (medians); caller turn {args.user_seconds:g} s; "
          f"wall time {time.perf_counter() - started:.0f} s\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "device": str(device), "dtype": str(dtype),
                                         "repeats": args.repeats, "rows": rows}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
