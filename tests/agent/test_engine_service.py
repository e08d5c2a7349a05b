"""Call servers on an engine service (`engine: grpc://...` in the agent file): whole calls through the
real pipeline, an engine that dies mid-call, two call-server processes on one engine, and the errors
and status a server gives about its engine. The engine runs the tiny model on 127.0.0.1, on a thread
of the test's process or as `chroma-agent engine` in a process of its own (to be killed)."""

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.engine_command import tiny_engine_command
from agent.runtime import AgentRuntime
from agent.simulate import simulate_call
from agent.spec import AgentFileError, load_agent
from processors import audio_io
from processors.chroma.engine_server import EngineThread
from processors.chroma.remote import RemoteEngine
from tests.speech import requires_espeak, silence, synthesize

ROOT = Path(__file__).resolve().parents[2]
RATE = 16000
ENGINE_START_SECS = 180  # a cold `chroma-agent engine` on a loaded 2-core machine: imports and the tiny model


def agent_file(
    tmp_path: Path, engine: str | None, *, max_seconds: float = 1, name: str = "agent.yaml"
) -> Path:
    path = tmp_path / name
    path.write_text(
        f"""
name: engine test agent
voice: {ROOT / "examples/voices/demo"}
system_prompt: You are a test agent.
{f"engine: {engine}" if engine else ""}
turn:
  detector: silence
  silence_secs: 0.5
response:
  max_seconds: {max_seconds}
  on_model_error:
    say: Sorry, say that again?
    goodbye: Sorry, goodbye.
"""
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def engine_process(max_sessions: int = 8):
    """`chroma-agent engine` in its own process; yields (url, process)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        tiny_engine_command(port, max_sessions),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"grpc://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ENGINE_START_SECS
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                raise AssertionError(f"the engine exited with {process.returncode}")
            if line.startswith("serving grpc://"):
                break
        else:
            raise AssertionError(f"the engine did not start within {ENGINE_START_SECS} s")
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def caller(*parts) -> np.ndarray:
    return np.concatenate([p if isinstance(p, np.ndarray) else silence(p, RATE) for p in parts])


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    audio_io.write_wav(path, samples, rate)
    return path


@requires_espeak
async def test_a_call_through_the_whole_pipeline_is_served_by_the_engine_service(tmp_path, tiny_model):
    with EngineThread(tiny_model) as url:
        runtime = AgentRuntime(load_agent(agent_file(tmp_path, url)))
        assert isinstance(runtime.model, RemoteEngine) and runtime.model_name == "tiny" and runtime.stand_in
        await runtime.prepare()  # the goodbye lines are rendered through the engine too
        assert runtime.model_error_audio.apology and runtime.model_error_audio.goodbye
        audio = caller(
            0.3, synthesize("Hello, where is my order?", RATE), 3.0, synthesize("Thank you.", RATE), 3.0
        )
        call, recording, _transport = await asyncio.wait_for(
            simulate_call(runtime, audio, RATE, out_rate=8000, settle_secs=0.5), 60
        )
        assert not call.errors and call.stats.turns == 2 and len(call.stats.ttfa) == 2
        assert np.abs(recording).max() > 100  # the agent spoke, through the engine
        status = runtime.model.status()
        assert status["sessions_opened"] == 3  # two lines rendered, one call
        deadline = time.monotonic() + 10
        while runtime.model.status()["open_sessions"] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert runtime.model.status()["open_sessions"] == 0  # the call's end freed its session
        runtime.model.close()


@requires_espeak
async def test_an_engine_killed_mid_call_ends_the_call_politely_and_promptly(tmp_path):
    with engine_process() as (url, process):
        runtime = AgentRuntime(load_agent(agent_file(tmp_path, url, max_seconds=30)))
        await runtime.prepare()
        goodbye = runtime.model_error_audio.goodbye
        assert goodbye
        # The caller talks once, then stays on the line for a minute: only the lost engine ends the call.
        audio = caller(0.3, synthesize("Hello, where is my order?", RATE), 60.0)
        killed: list[float] = []

        async def kill_at_first_audio():
            while not call_holder or not call_holder[0].stats.ttfa:
                await asyncio.sleep(0.05)
            process.kill()
            killed.append(time.monotonic())

        call_holder = []
        original = runtime.new_call

        def new_call(*args, **kwargs):
            call_holder.append(original(*args, **kwargs))
            return call_holder[-1]

        runtime.new_call = new_call
        killer = asyncio.create_task(kill_at_first_audio())
        try:
            call, _recording, transport = await asyncio.wait_for(
                simulate_call(runtime, audio, RATE, out_rate=24000, settle_secs=0.5), 90
            )
        finally:
            killer.cancel()
        ended = time.monotonic()
        assert killed, "the call never got audio from the engine"
        assert ended - killed[0] < 30  # bounded: the goodbye (about 2 s) and the hang-up, not the minute
        kinds = [kind for _t, kind, _d in call.timeline]
        assert [k for k in kinds if k in ("engine_lost", "turn_failed", "agent_hung_up")] == [
            "engine_lost",
            "turn_failed",
            "agent_hung_up",  # one failed reply is enough: goodbye, hang up
        ]
        assert call.ended_by_agent and not call.errors
        heard = b"".join(samples.tobytes() for _t, _rate, samples in transport.agent_chunks)
        assert heard.find(goodbye) >= 0  # the caller heard the goodbye line, whole
        assert runtime.model.sessions_lost == 1
        assert "chroma_engine_sessions_lost 1" in runtime.metrics.render()
        runtime.model.close()


@requires_espeak
def test_two_call_server_processes_share_one_engine(tmp_path):
    talk = write_wav(
        tmp_path / "caller.wav",
        caller(0.3, synthesize("Hello, where is my order?", RATE), 8.0, synthesize("Thank you.", RATE), 8.0),
        RATE,
    )
    with engine_process() as (url, engine):
        watcher = RemoteEngine(url, status_every=0.1)
        agent = agent_file(tmp_path, url)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        servers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agent.cli",
                    "call",
                    str(agent),
                    "--input",
                    str(talk),
                    "--output",
                    str(tmp_path / f"out{i}.wav"),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
        most_open = 0
        deadline = time.monotonic() + 240
        while any(s.poll() is None for s in servers) and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                most_open = max(most_open, watcher.status()["open_sessions"])
            time.sleep(0.1)
        outputs = []
        for server in servers:
            if server.poll() is None:
                server.kill()
            outputs.append(server.communicate(timeout=10)[0])
        assert [s.returncode for s in servers] == [0, 0], outputs
        assert all("turn 1:" in out and "turn 2:" in out for out in outputs)
        assert watcher.status()["sessions_opened"] == 2
        # both calls on the engine at once (each lasts about 20 s; the processes start together)
        assert most_open == 2
        for i in range(2):
            assert np.abs(audio_io.to_pcm16(audio_io.read_audio(tmp_path / f"out{i}.wav"))).max() > 100
        watcher.close()
        engine.terminate()  # SIGTERM: the engine stops serving and exits cleanly
        assert engine.wait(30) == 0


def test_a_server_whose_engine_does_not_answer_says_which_url_and_what_was_expected(tmp_path, capsys):
    url = f"grpc://127.0.0.1:{free_port()}"
    code = main(["serve", str(agent_file(tmp_path, url)), "--port", str(free_port())])
    err = capsys.readouterr().err
    assert code == 2
    assert f"engine: engine {url}: no answer" in err and "expected `chroma-agent engine` listening at" in err


async def test_readiness_and_metrics_read_the_shared_engine(tmp_path, tiny_model, voice):
    served = EngineThread(tiny_model, max_sessions=1)
    url = served.start()
    runtime = AgentRuntime(load_agent(agent_file(tmp_path, url)))
    try:
        state = runtime.engine_state()
        assert state["max_sessions"] == 1 and state["open_sessions"] == 0 and not state["behind_real_time"]
        assert runtime.busy_reason() is None
        assert "chroma_engine_connected 1" in runtime.metrics.render()
        other = RemoteEngine(url).new_session(voice, max_frames=2)  # another call server's call fills it
        async for _chunk in other.respond(None, say="Hi."):
            pass
        deadline = time.monotonic() + 10
        while runtime.busy_reason() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert runtime.busy_reason() == "engine at capacity: 1 of its max_sessions 1"
        other.close()
        await asyncio.to_thread(served.stop, 0)
        deadline = time.monotonic() + 15
        while "unavailable" not in (runtime.busy_reason() or "") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        reason = runtime.busy_reason()
        assert reason.startswith("engine status unavailable") and url in reason
        assert "chroma_engine_connected 0" in runtime.metrics.render()
    finally:
        runtime.model.close()
        served.stop()


@pytest.mark.parametrize("value", ["http://127.0.0.1:7400", "grpc://127.0.0.1", "grpc://127.0.0.1:0"])
def test_an_engine_that_is_not_a_grpc_url_fails_the_agent_file_on_its_line(tmp_path, value):
    with pytest.raises(AgentFileError) as err:
        load_agent(agent_file(tmp_path, value))
    assert f"agent.yaml:5: engine: {value!r} is not allowed; expected grpc://HOST:PORT" in str(err.value)


def test_the_engine_command_checks_its_flags_before_loading_the_model(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["engine", "--model", "tiny", "--port", str(port)]) == 2
        assert f"--port {port} (gRPC): cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["engine", "--model", "tiny", "--max-sessions", "0"]) == 2
    assert "--max-sessions is 0, expected at least 1" in capsys.readouterr().err
