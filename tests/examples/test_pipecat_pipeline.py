"""Chroma in a plain pipecat pipeline: the example runs, the service is built from a model and a voice,
pipecat's own FlowManager drives it, and a pipeline with no VAD is called out instead of staying silent."""

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from loguru import logger
from pipecat.flows import FlowManager, FlowsFunctionSchema
from pipecat.frames.frames import EndFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.workers.runner import WorkerRunner

from processors.audio_io import read_audio
from processors.chroma import ChromaS2SService, ChromaSettings, open_session
from processors.chroma.scripted import Call, Say, ScriptedReasoner
from processors.playout import PlayoutTracker, with_playout
from tests.speech import recorded
from transports.file import FileCallTransport

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "pipecat_pipeline" / "bot.py"
VOICE = ROOT / "examples" / "voices" / "demo"
CALLER = ROOT / "tests" / "fixtures" / "speech" / "complete.wav"  # "Can I have the chicken, please?" 1.6 s


def _example():
    spec = importlib.util.spec_from_file_location("pipecat_pipeline_bot", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_runs_and_the_agent_answers_after_the_caller(tmp_path):
    out = tmp_path / "reply.wav"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--caller", str(CALLER), "--out", str(out), "--max-seconds", "2"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the agent spoke" in done.stdout
    reply = read_audio(out)
    heard = np.flatnonzero(np.abs(reply) > 0)
    assert heard.size, "the agent said nothing"
    caller_secs = read_audio(CALLER).size / 22050
    # it answered the caller's turn (not before the caller had spoken), and within the 2 s cap (counted
    # in samples: on a busy machine the reply's chunks may play with gaps between them)
    assert heard[0] / 24000 > caller_secs
    assert heard.size / 24000 <= 2.0 + 0.2


def test_built_from_a_model_and_a_voice(tiny_model):
    service = ChromaS2SService(model=tiny_model, voice=str(VOICE), settings=ChromaSettings(top_k=20, temperature=0.5))
    session = service.session
    assert session.voice_name == "demo"
    assert session.sampling.top_k == 20 and session.sampling.do_sample
    assert session.max_frames == ChromaSettings().max_frames == 375


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs model="),
        ({"model": "tiny"}, "needs model="),
        ({"voice": str(VOICE)}, "needs model="),
    ],
)
def test_constructor_errors_say_what_is_needed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChromaS2SService(**kwargs)


def test_a_session_and_a_model_together_are_refused(tiny_model):
    session = open_session(tiny_model, str(VOICE))
    with pytest.raises(ValueError, match="not both"):
        ChromaS2SService(session, model=tiny_model)


@pytest.mark.parametrize(("field", "value"), [("temperature", 3.0), ("top_k", 0), ("chunk_frames", 9), ("max_seconds", 0)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ChromaSettings\.{field} is {value!r}"):
        ChromaSettings(**{field: value})


def test_with_playout_puts_the_tracker_right_after_the_output():
    transport = FileCallTransport(np.zeros(1600, np.int16), 16000)
    output, tracker = with_playout(transport)
    assert output is transport.output()
    assert isinstance(tracker, PlayoutTracker)


async def _run(transport, worker, until_quiet, secs=2.0):
    async def hang_up():
        await transport.caller_done.wait()
        quiet = 0.0
        while quiet < secs:
            await asyncio.sleep(0.05)
            quiet = 0.0 if until_quiet() else quiet + 0.05
        await worker.queue_frame(EndFrame())

    watcher = asyncio.create_task(hang_up())
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    try:
        await asyncio.wait_for(runner.run(), timeout=120)
    finally:
        watcher.cancel()


async def test_pipecats_own_flow_manager_runs_a_tool_and_moves_on(tiny_model):
    """A flow written for pipecat alone (nodes and a handler in Python), with Chroma as its LLM."""
    reasoner = ScriptedReasoner(
        tiny_model.tokenizer,
        [["One moment. ", Call("check_table", {"party_size": 4}), Say(lambda r: f"Table {r['table']}.")]],
    )
    chroma = ChromaS2SService(
        open_session(tiny_model, str(VOICE), ChromaSettings(max_seconds=3), thinker_stream=reasoner)
    )
    seen: list[dict] = []

    async def check_table(args, flow_manager):
        seen.append(dict(args))
        flow_manager.state["party_size"] = args["party_size"]
        return {"table": 12}, confirm_node()

    def confirm_node():
        return {"name": "confirm", "task_messages": [{"role": "system", "content": "Confirm the table."}]}

    def start_node():
        return {
            "name": "start",
            "task_messages": [{"role": "system", "content": "Ask how many people are coming."}],
            "respond_immediately": False,
            "functions": [
                FlowsFunctionSchema(
                    name="check_table",
                    description="Find a table for a party.",
                    properties={"party_size": {"type": "integer"}},
                    required=["party_size"],
                    handler=check_table,
                )
            ],
        }

    transport = FileCallTransport(recorded("complete", 16000), 16000, output_rate=24000)
    worker, aggregators = _example().build_pipeline(transport, chroma)
    manager = FlowManager(worker=worker, llm=chroma, context_aggregator=aggregators)
    texts: list[str] = []

    @chroma.event_handler("on_turn_finished")
    async def _finished(_service, text, _interrupted):
        texts.append(text)

    @worker.event_handler("on_pipeline_started")
    async def _started(_worker, _frame):
        await manager.initialize(start_node())

    await _run(transport, worker, lambda: chroma.speaking or chroma.hearing or transport.cursor > transport.clock.now())
    assert seen == [{"party_size": 4}]
    assert manager.state["party_size"] == 4
    assert manager.current_node == "confirm"
    assert "Table 12." in "".join(texts)


async def test_no_vad_upstream_is_called_out_once(tiny_model):
    """A user aggregator without a VAD never starts a turn: the agent cannot answer, and says why."""
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING", filter=lambda r: "no user turn" in r["message"])
    speech = np.concatenate([recorded("complete", 16000)] * 4)  # ~6.5 s of talking
    transport = FileCallTransport(speech, 16000, output_rate=24000)
    chroma = ChromaS2SService(open_session(tiny_model, str(VOICE), ChromaSettings(max_seconds=2)))
    aggregators = LLMContextAggregatorPair(LLMContext())  # no vad_analyzer
    pipeline = Pipeline([transport.input(), aggregators.user(), chroma, *with_playout(transport), aggregators.assistant()])
    worker = PipelineWorker(pipeline, params=PipelineParams(audio_in_sample_rate=16000, audio_out_sample_rate=24000))
    try:
        await _run(transport, worker, lambda: transport.cursor > transport.clock.now(), secs=0.5)
    finally:
        logger.remove(sink)
    assert len(warnings) == 1
    assert "vad_analyzer" in warnings[0]
    assert not np.any(transport.recording())  # and indeed: no reply


async def test_with_a_vad_there_is_no_such_warning(tiny_model):
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING", filter=lambda r: "no user turn" in r["message"])
    speech = np.concatenate([recorded("complete", 16000)] * 4)
    transport = FileCallTransport(speech, 16000, output_rate=24000)
    chroma = ChromaS2SService(open_session(tiny_model, str(VOICE), ChromaSettings(max_seconds=1)))
    worker, _ = _example().build_pipeline(transport, chroma)
    try:
        await _run(transport, worker, lambda: chroma.speaking or chroma.hearing or transport.cursor > transport.clock.now())
    finally:
        logger.remove(sink)
    assert warnings == []
    assert np.any(transport.recording())
