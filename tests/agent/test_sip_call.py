"""Whole SIP calls to an agent (tiny model) through the real SipServer, SipCalls and RTP media,
placed by real SIP phones: SIPp (speech, an RFC 4733 key, BYE; and a 20-call load run) and baresip
(which records what it heard, so the agent's audio is checked as the caller received it)."""

import asyncio
import random
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import InputDTMFFrame
from pipecat.observers.base_observer import BaseObserver, FramePushed

from agent.lines.sip import sip_server
from agent.runtime import AgentRuntime
from agent.server import create_app
from agent.spec import load_agent
from agent.testing.baresip import BARESIP, configure
from processors.audio import ulaw_encode
from processors.audio_io import read_audio, write_wav
from tests.speech import requires_espeak, silence, synthesize

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = Path(__file__).parent / "sip_scenarios"
SIPP = shutil.which("sipp")
DTMF_PCAP = Path("/usr/share/sip-tester/dtmf_2833_5.pcap")
HOST = "127.0.0.1"

needs_sipp = pytest.mark.skipif(SIPP is None, reason="sipp is not installed (apt-get install sip-tester)")


def free_port(span: int = 1) -> int:
    """A port P with P..P+span-1 free on 127.0.0.1 (SIPp's media port takes the ones after it too)."""
    for _ in range(200):
        port = random.randrange(20000, 60000, 2)
        sockets = []
        try:
            for offset in range(span):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(sock)
                sock.bind((HOST, port + offset))
            return port
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free UDP port found")


def agent_file(folder: Path, extra: str = "") -> Path:
    """A tiny-model agent with short turns and replies, speaking in the demo voice."""
    path = folder / "agent.yaml"
    path.write_text(
        f"name: sip test agent\nmodel: tiny\nvoice: {ROOT / 'examples/voices/demo'}\nsystem_prompt: You are a test agent.\n"
        "turn: {detector: silence, silence_secs: 0.5}\nresponse: {max_seconds: 1}\n" + extra
    )
    return path


class DtmfLog(BaseObserver):
    def __init__(self):
        super().__init__()
        self.keys: list[KeypadEntry] = []
        self._seen: set[int] = set()

    async def on_push_frame(self, data: FramePushed):
        if isinstance(data.frame, InputDTMFFrame) and data.frame.id not in self._seen:
            self._seen.add(data.frame.id)
            self.keys.append(data.frame.button)


@pytest.fixture
async def agent(tmp_path, tiny_model):
    """A running SIP agent; yields (server, handler, calls, dtmf_log). Every call it builds is recorded."""
    rtp_first = random.randrange(30000, 59000, 2)
    sip = f"{{enabled: true, host: {HOST}, port: {free_port()}, rtp_ports: [{rtp_first}, {rtp_first + 199}], max_calls: 25}}"
    path = agent_file(tmp_path, f"transports:\n  sip: {sip}\n")
    runtime = AgentRuntime(load_agent(path), model=tiny_model)
    calls, dtmf = [], DtmfLog()
    new_call = runtime.new_call

    def recording_new_call(transport, **kwargs):
        call = new_call(transport, **kwargs)
        call.worker.add_observer(dtmf)
        calls.append(call)
        return call

    runtime.new_call = recording_new_call
    server = sip_server(runtime)
    await server.start()
    try:
        yield server, server.handler, calls, dtmf
    finally:
        await server.stop()
        await server.handler.close()


async def run(command: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode, output.decode(errors="replace")[-3000:]


async def sipp(
    scenario: str, server_port: int, workdir: Path, *options: str, calls: int = 1, timeout: int = 40
):
    command = [
        SIPP, "-sf", str(SCENARIOS / scenario), "-s", "agent", "-i", HOST, "-p", str(free_port()),
        "-mp", str(free_port(4)), "-m", str(calls), "-nostdin", "-timeout", f"{timeout}s", "-timeout_error",
        "-trace_err", *options, f"{HOST}:{server_port}",
    ]  # fmt: skip
    code, output = await run(command, workdir, timeout + 15)
    errors = "\n".join(p.read_text(errors="replace")[-2000:] for p in workdir.glob("*_errors.log"))
    assert code == 0, f"sipp exited {code}\n{output}\n{errors}"


def caller_speech(workdir: Path, text: str) -> np.ndarray:
    """Raw mu-law 8 kHz for SIPp's rtp_stream (no header: SIPp sends the file byte for byte)."""
    pcm = synthesize(text, 8000)
    (workdir / "caller.ulaw").write_bytes(ulaw_encode(pcm))
    return pcm


async def all_ended(handler, count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while handler.media or len(handler.finished) < count:
        assert time.monotonic() < deadline, (
            f"{len(handler.media)} calls still up, {len(handler.finished)} ended"
        )
        await asyncio.sleep(0.05)


@requires_espeak
@needs_sipp
async def test_sipp_call_speaks_presses_a_key_and_hangs_up(agent, tmp_path):
    server, handler, calls, dtmf = agent
    caller_speech(tmp_path, "Hello, I would like to check on my order please.")
    shutil.copy(DTMF_PCAP, tmp_path / "dtmf.pcap")

    await sipp("uac_speech_dtmf.xml", server.port, tmp_path)
    await all_ended(handler, 1)

    ((call_id, reason, rtp),) = handler.finished
    assert reason == "bye"
    assert rtp["packets_in"] > 80 and rtp["bad"] == 0  # the caller's speech arrived as RTP
    assert rtp["packets_out"] > 200  # ours went back on the 20 ms clock for the whole call
    assert dtmf.keys == [KeypadEntry.FIVE]  # the pcap's RFC 4733 key, as InputDTMFFrame in the pipeline
    (call,) = calls
    assert call.stats.call_id == call_id and call.stats.turns >= 1 and call.stats.ttfa
    assert handler.pool.in_use == set() and server.dialogs == {}
    await asyncio.wait_for(_no_calls(call.runtime), 10)


async def _no_calls(runtime) -> None:
    while runtime.calls:
        await asyncio.sleep(0.05)


@requires_espeak
@pytest.mark.skipif(BARESIP is None, reason="baresip is not installed (apt-get install baresip)")
async def test_baresip_caller_hears_the_agent_answer(agent, tmp_path):
    server, handler, calls, _dtmf = agent
    speech = synthesize("Hello, can you tell me when the shop opens tomorrow?", 8000)
    wav = tmp_path / "caller8k.wav"
    # baresip hangs up when its file ends, so the silence after the question is the agent's time to answer.
    write_wav(wav, np.concatenate([silence(0.5, 8000), speech, silence(3.0, 8000)]), 8000)
    config = configure(tmp_path, wav)

    code, output = await run(
        [BARESIP, "-f", str(config), "-e", f"/dial sip:agent@{HOST}:{server.port}", "-t", "9"], tmp_path, 40
    )
    await all_ended(handler, 1)

    ((_call_id, reason, rtp),) = handler.finished
    assert rtp["packets_in"] > 200 and rtp["packets_out"] > 200, (rtp, output)
    decoded = list((tmp_path / "rec").glob("*dec.wav"))
    assert decoded, f"baresip recorded nothing\n{output}"
    heard = read_audio(decoded[0]).astype(np.float64)
    assert calls and calls[0].stats.ttfa, output
    # The tiny model speaks noise, not words: the check is that the agent's audio reached the caller.
    blocks = heard[: heard.size // 160 * 160].reshape(-1, 160)
    loud = np.sqrt((blocks**2).mean(axis=1)) > 0.01
    assert loud.sum() >= 10, f"caller heard {loud.sum()} non-silent 20 ms blocks\n{output}"
    assert reason in ("bye", "hangup")
    assert handler.pool.in_use == set()


# Each caller stays up this long after its call is answered. Replies to 20 turns ending together queue
# for the model: measured on a loaded 2-core machine, first audio came 0.2 s later per call in the queue
# (0.6 s to 2.8 s for the first 11), and 9 of 20 callers had hung up unanswered when they stayed 6 s. The
# turn ends about 3 s in, so this leaves ~17 s, over 3x the ~5 s the 20th answer took; how fast answers
# come is bench.phone's to measure, not this test's.
LOAD_CALL_HOLD_SECS = 20


@requires_espeak
@needs_sipp
async def test_sipp_load_of_20_concurrent_calls_all_complete(agent, tmp_path):
    server, handler, calls, _dtmf = agent
    caller_speech(tmp_path, "Hello, I would like to check on my order.")
    most = 0
    start = handler.start

    async def counting_start(dialog):
        nonlocal most
        await start(dialog)
        most = max(most, sum(1 for m in handler.media.values() if m.call is not None))

    handler.start = counting_start
    await sipp(
        "uac_speech.xml",
        server.port,
        tmp_path,
        "-r",
        "20",
        "-rp",
        "1s",
        "-l",
        "20",
        "-d",
        str(LOAD_CALL_HOLD_SECS * 1000),
        calls=20,
        timeout=LOAD_CALL_HOLD_SECS + 60,
    )
    await all_ended(handler, 20, timeout=30)

    assert len(handler.finished) == 20 and {r for _, r, _ in handler.finished} == {"bye"}
    assert all(rtp["packets_in"] > 50 and rtp["packets_out"] > 100 for _, _, rtp in handler.finished)
    assert most == 20
    unanswered = [call.stats.summary() for call in calls if not call.stats.ttfa]
    assert len(calls) == 20 and not unanswered, unanswered  # every caller got an answer
    print(f"20-call load: slowest first answer {max(call.stats.ttfa[0] for call in calls):.2f} s after its turn")
    assert all(call.stats.failed_turns == 0 for call in calls)
    assert handler.pool.in_use == set() and server.dialogs == {}


async def test_the_app_runs_the_sip_server_for_its_lifespan(tmp_path, tiny_model):
    port = free_port()
    sip = f"{{enabled: true, host: {HOST}, port: {port}}}"
    runtime = AgentRuntime(load_agent(agent_file(tmp_path, f"transports:\n  sip: {sip}\n")), model=tiny_model)
    app = create_app(runtime)
    options = (
        f"OPTIONS sip:agent@{HOST}:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {HOST}:9;branch=z9hG4bK-lifespan-1;rport\r\n"
        f"From: <sip:probe@{HOST}>;tag=1\r\nTo: <sip:agent@{HOST}>\r\nCall-ID: lifespan-1\r\n"
        "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((HOST, 0))
        probe.settimeout(3)
        async with app.router.lifespan_context(app):
            probe.sendto(options, (HOST, port))
            reply = await asyncio.get_running_loop().run_in_executor(None, probe.recv, 4096)
            assert reply.startswith(b"SIP/2.0 200")
    await asyncio.sleep(0.01)  # asyncio closes a datagram socket on the loop's next turn
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind((HOST, port))  # the SIP port was released on shutdown


def _request(method: str, port: int, call_id: str, *, body: bytes = b"", cseq: int = 1, me: int = 9) -> bytes:
    head = (
        f"{method} sip:agent@{HOST}:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {HOST}:{me};branch=z9hG4bK-{call_id}-{cseq};rport\r\n"
        f"From: <sip:+15550001111@{HOST}>;tag=t-{call_id}\r\nTo: <sip:agent@{HOST}>\r\nCall-ID: {call_id}\r\n"
        f"CSeq: {cseq} {method}\r\nContact: <sip:caller@{HOST}:{me}>\r\nMax-Forwards: 70\r\n"
    )
    if body:
        head += "Content-Type: application/sdp\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def _offer(port: int) -> bytes:
    return (
        f"v=0\r\no=- 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0 101\r\n"
        "a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=ptime:20\r\n"
    ).encode()


async def test_an_unacked_call_counts_against_max_sessions_and_refusals_show_in_metrics(tmp_path, tiny_model):
    """A 200 OK never ACKed holds a session (visible, and the next INVITE is busy) until the no-ACK
    timeout frees it; every refusal is counted in /metrics by its reason."""
    runtime = AgentRuntime(load_agent(agent_file(tmp_path, "max_sessions: 1\n")), model=tiny_model)
    spec = runtime.spec.transports.sip.model_copy(update={"enabled": True, "port": 0, "rtp_ports": (free_port(), 0)})
    spec = spec.model_copy(update={"rtp_ports": (spec.rtp_ports[0], spec.rtp_ports[0] + 7)})
    server = sip_server(runtime, spec, t1=0.05, t2=0.2, t4=0.2)  # no ACK for 64*T1 = 3.2 s
    await server.start()
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    me = sock.getsockname()[1]

    async def final(method: str) -> bytes:
        while True:
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
            status = int(data.split(b" ", 2)[1]) if data.startswith(b"SIP/2.0 ") else 0
            if status >= 200 and f" {method}\r\n".encode() in data:
                return data

    def metric(name: str) -> float:
        for line in runtime.metrics.render().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    try:
        await loop.sock_sendto(sock, _request("INVITE", server.port, "held", body=_offer(free_port()), me=me), (HOST, server.port))
        assert (await final("INVITE")).startswith(b"SIP/2.0 200")
        # answered, not ACKed: no call runs yet, but the session is spoken for and shows
        assert runtime.calls == {} and runtime.sessions == 1
        assert metric("chroma_sip_calls_awaiting_ack") == 1 and metric("chroma_agents_sessions") == 1
        await loop.sock_sendto(sock, _request("INVITE", server.port, "next", body=_offer(free_port()), me=me), (HOST, server.port))
        assert (await final("INVITE")).startswith(b"SIP/2.0 486")
        await loop.sock_sendto(sock, _request("OPTIONS", server.port, "probe", me=me), (HOST, server.port))
        assert (await final("OPTIONS")).startswith(b"SIP/2.0 503")
        bad = _offer(free_port()).replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 999.999.1.1")
        await loop.sock_sendto(sock, _request("INVITE", server.port, "bad", body=bad, me=me), (HOST, server.port))
        assert (await final("INVITE")).startswith(b"SIP/2.0 486")  # still busy: capacity is asked first
        # 64*T1 without the ACK: BYE from us, the session and the ports are free again
        while b"BYE sip:" not in (data := await asyncio.wait_for(loop.sock_recv(sock, 4096), 6)):
            pass
        await loop.sock_sendto(sock, b"SIP/2.0 200 OK\r\n" + data.split(b"\r\n", 1)[1], (HOST, server.port))
        for _ in range(200):
            if runtime.sessions == 0:
                break
            await asyncio.sleep(0.02)
        assert runtime.sessions == 0 and metric("chroma_sip_calls_awaiting_ack") == 0
        await loop.sock_sendto(sock, _request("INVITE", server.port, "bad2", body=bad, me=me), (HOST, server.port))
        refused = await final("INVITE")
        assert refused.startswith(b"SIP/2.0 488") and b"999.999.1.1" in refused
        assert runtime.sessions == 0 and server.handler.pool.in_use == set()
        text = runtime.metrics.render()
        for reason, n in (("busy", 2), ("no_ack", 1), ("bad_sdp", 1)):
            assert f'chroma_sip_refusals_total{{reason="{reason}"}} {n}' in text.splitlines(), text
    finally:
        sock.close()
        await server.stop()
        await server.handler.close()
