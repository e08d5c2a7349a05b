"""SIP part: N concurrent SIPp calls (speech over PCMU RTP, looped) and, alongside them, probe calls from
transports.sip.caller that time what a caller hears: reply pacing and barge-in to RTP stopped."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from processors.audio import ulaw_decode, ulaw_encode
from transports.sip.caller import SipCaller

from ..pipeline.common import BARGE_SENTENCES, PHONE_RATE, ROOT, log, loud_span
from .common import LOUD_RMS, PhoneServer, cpu_seconds, free_port

SCENARIO = ROOT / "bench" / "phone" / "sipp_uac.xml"
BARGE_AFTER_SECS = 0.6  # the probe cuts in this long after the reply's first audio


def _loud(payload: bytes) -> bool:
    pcm = ulaw_decode(payload).astype(np.float64)
    return bool(pcm.size) and float(np.sqrt((pcm**2).mean())) > LOUD_RMS


async def _wait_loud(caller: SipCaller, since: float, timeout: float) -> float | None:
    """Arrival of the first reply-carrying packet after `since`."""
    deadline = time.monotonic() + timeout
    checked = 0
    while time.monotonic() < deadline:
        packets = caller.received
        for p in packets[checked:]:
            if p.arrival >= since and _loud(p.payload):
                return p.arrival
        checked = len(packets)
        await asyncio.sleep(0.01)
    return None


def _reply_packets(caller: SipCaller, start: float, end: float) -> list[float]:
    return [p.arrival for p in caller.received if start <= p.arrival <= end and _loud(p.payload)]


async def probe_call(server: PhoneServer, speech, seconds: float, index: int) -> dict:
    """One caller: asks, listens to the whole reply (pacing), asks again and cuts in (barge-in)."""
    out = {"replies": 0, "reply_latency": [], "gaps": [], "barge_in": [], "failed": None}
    caller = SipCaller("127.0.0.1", server.sip_port)
    try:
        await caller.dial()
    except Exception as e:  # reported, not raised: the run goes on
        out["failed"] = f"dial: {e}"
        return out
    question, cut_in = BARGE_SENTENCES[index % len(BARGE_SENTENCES)]
    ask, barge = speech.samples(question, PHONE_RATE), speech.samples(cut_in, PHONE_RATE)
    end = time.monotonic() + seconds
    turn = 0
    try:
        while time.monotonic() < end - 5:
            turn += 1
            onset = await caller.say(ask)
            spoken_end = onset + loud_span(ask, PHONE_RATE)[1]  # the speech's end, not the clip's
            first = await _wait_loud(caller, spoken_end, timeout=6)
            if first is None:
                continue
            out["replies"] += 1
            out["reply_latency"].append(first - spoken_end)
            if turn % 2 == 0:
                await asyncio.sleep(max(0.0, first + BARGE_AFTER_SECS - time.monotonic()))
                cut = await caller.say(barge)
                await asyncio.sleep(1.5)
                loud = _reply_packets(caller, cut, cut + 1.5)
                # RTP stopped: the arrival of the last reply packet after the cut-in (on loopback, when it
                # was sent), as `clear` received is for Twilio; the caller then hears its 20 ms play out
                out["barge_in"].append((loud[-1] - cut) if loud else 0.0)
                await asyncio.sleep(1.5)  # the cut-in itself is answered; let that reply play out
            else:
                await asyncio.sleep(3.0)
                arrivals = _reply_packets(caller, first, time.monotonic())
                out["gaps"] += [b - a - 0.02 for a, b in zip(arrivals, arrivals[1:], strict=False)]
            await asyncio.sleep(0.5)
    finally:
        await caller.hang_up()
    return out


def _even_free_port() -> int:
    """SIPp's media port: even, with the next ports free too (it also opens +2 for video)."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM) & ~1
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 2))
            return port
        except OSError:
            continue
    raise RuntimeError("no free even UDP port pair for SIPp's media")


def sipp_command(server: PhoneServer, calls: int, hold_secs: float, scenario: Path) -> list[str]:
    return [
        shutil.which("sipp") or "sipp", f"127.0.0.1:{server.sip_port}", "-sf", str(scenario), "-s", "agent",
        "-i", "127.0.0.1", "-p", str(free_port(socket.SOCK_DGRAM)), "-mp", str(_even_free_port()), "-r", "10", "-rp", "1s",
        "-l", str(calls), "-m", str(calls), "-d", str(int(hold_secs * 1000)), "-nostdin",
        "-timeout", f"{int(hold_secs + 60)}s", "-timeout_error", "-trace_err", "-trace_stat", "-fd", "1",
    ]


async def run_sip(server: PhoneServer, calls: int, seconds: float, speech, folder: Path) -> dict:
    """`calls` SIP calls at once: SIPp places calls - probes, the probes the rest."""
    probes = min(2, calls)
    audio = folder / "caller.ulaw"
    if not audio.exists():
        pcm = np.concatenate([speech.samples(BARGE_SENTENCES[0][0], PHONE_RATE), np.zeros(3 * PHONE_RATE, np.int16)])
        audio.write_bytes(ulaw_encode(pcm))
    # SIPp 3.6 does not substitute fields inside rtp_stream, so the file's path goes into a copy
    scenario = folder / "sipp_uac.xml"
    scenario.write_text(SCENARIO.read_text().replace("CALLER_AUDIO", str(audio)))
    sipp_calls = calls - probes
    cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
    proc = None
    if sipp_calls:
        log_file = open(folder / f"sipp-{calls}.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            sipp_command(server, sipp_calls, seconds, scenario), cwd=folder, stdout=log_file, stderr=subprocess.STDOUT
        )
        await asyncio.sleep(sipp_calls / 10 + 0.5)  # SIPp places 10 calls a second
    results = await asyncio.gather(*(probe_call(server, speech, seconds, i) for i in range(probes)))
    sipp_rc = None
    if proc is not None:
        sipp_rc = await asyncio.to_thread(proc.wait, seconds + 90)
        log_file.close()
    wall = time.monotonic() - t0
    cpu = cpu_seconds(server.pid) - cpu0
    server.wait_idle()
    log(f"SIP {calls} calls: SIPp exit {sipp_rc}, CPU {cpu:.1f} s over {wall:.1f} s")
    return {
        "calls": calls, "sipp_calls": sipp_calls, "sipp_exit": sipp_rc, "wall": wall, "cpu": cpu,
        "cpu_per_call": cpu / wall / calls, "probes": results,
    }
