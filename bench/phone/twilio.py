"""Twilio part: N concurrent stand-in Twilio calls (agent/testing/twilio_caller.py), each placed as
Twilio places one (signed voice webhook, then the signed media stream with the webhook's token), each
asking, cutting in on the reply, and hearing the answer to the cut-in out; repeated for the whole run."""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET

import numpy as np

from agent.testing.twilio_caller import TICK, TwilioCaller, fetch_voice_twiml, sid

from ..pipeline.common import BARGE_SENTENCES, PHONE_RATE, log, loud_span
from .common import PhoneServer, cpu_seconds
from .server import AUTH_TOKEN

ASK_AT = 0.5  # seconds into the stream the caller starts asking
BARGE_AFTER_SECS = 0.6  # the cut-in starts this long after the reply's first audio was heard
CALL_SECS = 11.0  # ask, the cut reply, the cut-in, its whole answer


def gap_lengths(empty_ticks: list[float]) -> list[float]:
    """Runs of consecutive empty ticks inside replies, as gap lengths in seconds."""
    gaps, run, last = [], 0, None
    for t in empty_ticks:
        if last is not None and round((t - last) / TICK) == 1:
            run += 1
        else:
            if run:
                gaps.append(run * TICK)
            run = 1
        last = t
    if run:
        gaps.append(run * TICK)
    return gaps


async def one_call(server: PhoneServer, speech, index: int) -> dict:
    base = f"http://127.0.0.1:{server.port}"
    call_sid = sid("CA")
    r = await fetch_voice_twiml(base, AUTH_TOKEN, public_base=base, form={"CallSid": call_sid, "From": "+15550100100"})
    stream = ET.fromstring(r.text).find("Connect/Stream") if r.status_code == 200 else None
    if stream is None:
        return {"failed": f"webhook {r.status_code}: {r.text[:80]}"}
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    caller = TwilioCaller(f"ws://127.0.0.1:{server.port}/twilio/media", AUTH_TOKEN, sign_url=stream.get("url"), parameters=params, call_sid=call_sid)
    question, cut_in = BARGE_SENTENCES[index % len(BARGE_SENTENCES)]
    ask, barge = speech.samples(question, PHONE_RATE), speech.samples(cut_in, PHONE_RATE)
    tl = await caller.run(ask, seconds=CALL_SECS, audio_at=ASK_AT, barge_in=(barge, BARGE_AFTER_SECS))
    starts = tl.reply_starts
    out = {"failed": None, "replies": len(starts), "reply_latency": [], "barge_in": [], "gaps": gap_lengths(tl.gaps())}
    if starts:
        out["reply_latency"].append(starts[0] - (ASK_AT + loud_span(ask, PHONE_RATE)[1]))  # from the speech's end
    if tl.barge_in_at is not None:
        clears = [t for t in tl.clear_times if t >= tl.barge_in_at]
        out["barge_in"].append(clears[0] - tl.barge_in_at if clears else None)
    echoed = dict((name, t) for t, name in tl.marks_echoed)
    out["mark_rtt"] = [echoed[name] - t for t, name in tl.marks_received if name in echoed]
    return out


async def run_twilio(server: PhoneServer, calls: int, seconds: float, speech) -> dict:
    """`calls` slots, each placing calls back to back for `seconds`; server CPU over the window."""
    end = time.monotonic() + seconds
    results: list[dict] = []

    async def slot(i: int) -> None:
        await asyncio.sleep(2.0 * i / calls)  # spread the first calls over 2 s, as callers arrive
        n = 0
        while time.monotonic() + CALL_SECS <= end + 2.0:
            try:
                results.append(await one_call(server, speech, i + n))
            except Exception as e:  # reported, not raised: the run goes on
                results.append({"failed": f"{type(e).__name__}: {e}"})
            n += 1

    cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
    await asyncio.gather(*(slot(i) for i in range(calls)))
    wall = time.monotonic() - t0
    cpu = cpu_seconds(server.pid) - cpu0
    server.wait_idle()
    ok = [r for r in results if not r["failed"]]
    failed = [r["failed"] for r in results if r["failed"]]
    if failed:
        log(f"Twilio {calls}: {len(failed)} calls failed, e.g. {failed[0]}")

    def flat(key):
        return [x for r in ok for x in r[key] if x is not None]

    log(f"Twilio {calls} calls: {len(results)} placed, CPU {cpu:.1f} s over {wall:.1f} s")
    return {
        "calls": calls, "placed": len(results), "failed": len(failed), "wall": wall, "cpu": cpu,
        "cpu_per_call": cpu / wall / calls, "replies": sum(r["replies"] for r in ok),
        "reply_latency": flat("reply_latency"), "barge_in": flat("barge_in"),
        "barge_in_missing": sum(1 for r in ok for x in r["barge_in"] if x is None),
        "gaps": flat("gaps"), "mark_rtt": flat("mark_rtt"), "empty_ticks_total": float(np.sum(flat("gaps"))),
    }
