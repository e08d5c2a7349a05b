"""Chroma in a plain pipecat pipeline: pipecat's own context, aggregators, VAD and runner, with
`ChromaS2SService` where a speech-to-speech (or STT + LLM + TTS) service would go.

    python examples/pipecat_pipeline/bot.py --caller examples/audio/hello.wav --out reply.wav
    python examples/pipecat_pipeline/bot.py --model FlashLabs/Chroma-4B --voice examples/voices/demo ...

The caller here is a WAV file played in real time (transports/file.py), so the example runs anywhere;
in an app, put any pipecat transport (SmallWebRTC, a WebSocket with a serializer, Daily) in its place:
`build_pipeline` does not change.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from pipecat.audio.vad.silero import SileroVADAnalyzer  # noqa: E402
from pipecat.frames.frames import EndFrame  # noqa: E402
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.processors.aggregators.llm_response_universal import (  # noqa: E402
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from processors.audio_io import read_audio, to_pcm16, write_wav  # noqa: E402
from processors.chroma import ChromaS2SService, ChromaSettings  # noqa: E402
from processors.playout import with_playout  # noqa: E402
from transports.file import FileCallTransport  # noqa: E402

HERE = Path(__file__).resolve().parent


def build_pipeline(transport, chroma: ChromaS2SService) -> tuple[PipelineWorker, LLMContextAggregatorPair]:
    """The whole agent: caller audio → turn detection → Chroma → the caller, and the conversation kept in
    pipecat's `LLMContext` (what a `FlowManager` works on, if you add one)."""
    context = LLMContext()
    # The VAD decides when the caller starts and stops talking; without one no turn ever ends and the
    # agent never replies (the service warns when it hears speech and sees no turns).
    aggregators = LLMContextAggregatorPair(
        context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())
    )
    pipeline = Pipeline(
        [
            transport.input(),
            aggregators.user(),
            chroma,
            # the output, then the tracker that tells Chroma how much of a cut reply the caller heard
            *with_playout(transport),
            aggregators.assistant(),
        ]
    )
    worker = PipelineWorker(pipeline, params=PipelineParams(audio_in_sample_rate=16000, audio_out_sample_rate=24000))
    return worker, aggregators


async def converse(transport: FileCallTransport, chroma: ChromaS2SService, quiet_secs: float = 2.0):
    """Run the call until the caller's file has played and the agent has been quiet for `quiet_secs`.
    Returns the pipeline's aggregators (the conversation is in their context)."""
    worker, aggregators = build_pipeline(transport, chroma)

    async def hang_up_when_quiet():
        await transport.caller_done.wait()
        clock, quiet_since = transport.clock, None
        while True:
            await asyncio.sleep(0.05)
            if chroma.speaking or chroma.hearing or transport.cursor > clock.now():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = clock.now()
            elif clock.now() - quiet_since >= quiet_secs:
                break
        await worker.queue_frame(EndFrame())

    watcher = asyncio.create_task(hang_up_when_quiet())
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    try:
        await runner.run()
    finally:
        watcher.cancel()
    return aggregators


async def run(caller: Path, out: Path, model: str, voice: str, max_seconds: float = 30.0) -> float:
    """Play `caller` into the agent and write what the agent said, on the call's timeline, to `out`.
    Returns the seconds of agent audio."""
    transport = FileCallTransport(to_pcm16(read_audio(caller, rate=16000)), 16000, output_rate=24000)
    settings = ChromaSettings(system_prompt="You are a friendly receptionist.", max_seconds=max_seconds)
    chroma = ChromaS2SService(model=model, voice=voice, settings=settings)
    await converse(transport, chroma)
    audio = transport.recording(duration=transport.clock.now())
    write_wav(out, audio, 24000)
    return float((audio != 0).sum()) / 24000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caller", type=Path, default=HERE.parents[1] / "examples/audio/hello.wav")
    parser.add_argument("--out", type=Path, default=Path("reply.wav"))
    parser.add_argument("--model", default="tiny", help="'tiny' (a noise-speaking stand-in), a folder or a HF id")
    parser.add_argument("--voice", default=str(HERE.parents[1] / "examples/voices/demo"))
    parser.add_argument("--max-seconds", type=float, default=30.0, help="cap on one reply's audio")
    args = parser.parse_args()
    spoken = asyncio.run(run(args.caller, args.out, args.model, args.voice, args.max_seconds))
    print(f"the agent spoke {spoken:.1f} s; wrote {args.out}")
    return 0 if spoken > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
