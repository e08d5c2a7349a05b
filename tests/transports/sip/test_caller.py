"""The small SIP phone (transports/sip/caller.py) against SIPp's answering side, which echoes RTP back:
it dials, streams paced audio, records what returns, sends DTMF and hangs up as a real phone would."""

import asyncio
import shutil
import socket
import subprocess

import numpy as np
import pytest

from processors.audio import ulaw_decode
from transports.sip.caller import SipCaller, SipCallFailed
from transports.sip.server import CallRejected, SipServer

SIPP = shutil.which("sipp")
pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp is not installed (apt-get install sip-tester)")


def free_udp_port(even: bool = False) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not even or port % 2 == 0:
            return port
    raise RuntimeError("no free UDP port")


@pytest.fixture
def echo_uas():
    """SIPp's built-in answering scenario, echoing the RTP it receives."""
    port, media = free_udp_port(), free_udp_port(even=True)
    proc = subprocess.Popen(
        [SIPP, "-sn", "uas", "-i", "127.0.0.1", "-p", str(port), "-mp", str(media), "-rtp_echo", "-nostdin", "-m", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    yield port, proc
    try:
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


async def test_dials_streams_paced_audio_hears_it_back_and_hangs_up(echo_uas):
    port, proc = echo_uas
    caller = SipCaller("127.0.0.1", port, user="service")
    await asyncio.wait_for(caller.dial(), 10)
    assert caller.remote_rtp is not None and caller.remote_rtp[0] == "127.0.0.1"
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.int16)  # 1 s
    onset = await caller.say(tone, "tone")
    assert caller.onsets["tone"] == onset
    await asyncio.sleep(1.4)
    await caller.send_dtmf("7")
    status = await caller.hang_up()
    assert status == 200
    assert proc.wait(timeout=10) == 0  # SIPp saw a complete call: INVITE, ACK, BYE

    echoed = [p for p in caller.received if p.payload_type == 0]
    loud = [p for p in echoed if np.sqrt(np.mean(ulaw_decode(p.payload).astype(float) ** 2)) > 3000]
    assert 45 <= len(loud) <= 52  # the 1 s tone came back, 20 ms a packet
    gaps = np.diff([p.arrival for p in loud])
    assert gaps.max() < 0.1  # sent on a 20 ms clock, not in a burst or with holes
    heard, first = caller.heard(since=onset)
    assert first >= onset and np.abs(heard).max() > 6000
    assert any(p.payload_type == 101 for p in caller.received)  # the DTMF event came back too


async def test_a_call_nobody_answers_fails_with_a_clear_error():
    caller = SipCaller("127.0.0.1", free_udp_port())
    with pytest.raises(TimeoutError, match="no final response to INVITE"):
        await caller.dial(timeout=1.2)
    assert caller._sip.is_closing() and caller._rtp.is_closing()  # its sockets are given back


async def test_a_refused_call_raises_with_the_status():
    class Refuses:
        async def offer(self, dialog, sdp):
            raise CallRejected(503, "no free RTP port")

        async def start(self, dialog):
            raise AssertionError("a refused call never starts")

        async def end(self, dialog, reason):
            pass

    server = SipServer(Refuses(), host="127.0.0.1", port=0, t1=0.05)
    await server.start()
    try:
        caller = SipCaller("127.0.0.1", server.port)
        with pytest.raises(SipCallFailed) as failed:
            await asyncio.wait_for(caller.dial(), 10)
        assert failed.value.status == 503
    finally:
        await server.stop()
    with pytest.raises(ValueError, match="payload_type 9"):
        SipCaller("127.0.0.1", 5060, payload_type=9)
