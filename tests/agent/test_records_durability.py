"""A server killed mid-call (SIGKILL: no shutdown code runs) leaves the call's record and recording:
`chroma-agent serve` with the tiny model, a Twilio stand-in caller on its real routes, the process
killed while the agent is answering, then started again on the same agent file."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path

import httpx
import numpy as np

from tests.agent.test_records_calls import RECORDS
from tests.agent.test_twilio_call import PUBLIC, dial
from tests.agent.test_twilio_call import agent_file as twilio_agent_file
from tests.speech import requires_espeak, synthesize

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 120


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_server(agent: Path, port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "serve", str(agent), "--port", str(port), "--public-url", PUBLIC],
        cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"the server exited {process.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if (await http.get(f"http://127.0.0.1:{port}/readyz", timeout=2)).status_code == 200:
                    return process
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.3)
    process.kill()
    raise AssertionError(f"the server did not get ready in {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@requires_espeak
async def test_a_call_cut_by_sigkill_is_found_after_a_restart_with_its_events_recording_and_crash(tmp_path):
    agent = twilio_agent_file(tmp_path, max_seconds=6)
    agent.write_text(agent.read_text() + RECORDS)
    port, log = free_tcp_port(), tmp_path / "server.log"
    speech = synthesize("Hello, I would like to check on my order please.", 8000)
    server = await start_server(agent, port, log)
    try:
        caller = await dial(f"127.0.0.1:{port}")
        streaming_from = time.time()  # the stand-in streams the caller's audio from its connection on
        running = asyncio.create_task(caller.run(speech, audio_at=0.3, seconds=30))
        # Kill while the agent is answering: 2 s after the caller first heard it.
        deadline = time.monotonic() + 30
        while not caller.timeline.media_times and time.monotonic() < deadline and not running.done():
            await asyncio.sleep(0.02)
        assert caller.timeline.media_times, "the agent never answered"
        await asyncio.sleep(2.0)
        killed_at = time.time()
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        timeline = await asyncio.wait_for(running, 15)
        heard_reply_for = timeline.media_times[-1] - timeline.media_times[0]
    finally:
        if server.poll() is None:
            server.kill()

    server = await start_server(agent, port, log)  # marks the calls a killed server left open
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            (listed,) = (await http.get("/api/calls")).json()["calls"]
            one = (await http.get(f"/api/calls/{listed['call_id']}")).json()
            recording = await http.get(f"/api/calls/{listed['call_id']}/recording")
    finally:
        stop(server)

    info, events = one["call"], one["events"]
    assert info["transport_ids"]["call_sid"] == caller.call_sid
    assert info["end_reason"] == "crash"
    kinds = [e["kind"] for e in events]
    # everything up to the agent's answer is there, in order, and the last event is from its last second
    for kind in ("caller_turn_started", "caller_turn_ended", "reply_started", "first_audio"):
        assert kind in kinds, f"{kind} missing from {kinds}"
    assert kinds.index("caller_turn_ended") < kinds.index("reply_started") < kinds.index("first_audio")
    assert [e["seq"] for e in events] == list(range(len(events)))
    first_audio_at = events[kinds.index("first_audio")]["at"]
    assert killed_at - 4.0 < first_audio_at < killed_at
    assert info["ended_at"] == events[-1]["at"]  # a crashed call ends at its last event

    # the recording plays, up to about a second before the kill, with the answer on the right
    assert recording.status_code == 200
    path = tmp_path / "got.wav"
    path.write_bytes(recording.content)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, 8000)
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, 2)
    assert len(pcm) * 4 == len(recording.content) - 44  # the header's sizes were kept up to date
    call_seconds = killed_at - streaming_from
    assert call_seconds - 1.5 < len(pcm) / 8000 <= call_seconds + 0.1
    assert np.abs(pcm[:, 0]).max() > 1000
    assert heard_reply_for > 1.0 and np.abs(pcm[:, 1]).max() > 1000
