"""A scenario's expectations and latency limits, checked over the events one or more runs recorded.

Pure functions of the scenario and the events: nothing here talks to an agent or a transport, so a
recorded run can be checked again offline. Turn numbers in check names count from 1 (as people
count); `Check.turn` is the 0-based index the events use.
"""

from __future__ import annotations

import math
from typing import Any

from .events import Check, Event, RunResult, first_audio_after, skipped, stopped_after, turn_anchor
from .scenario import REPLY_EVENTS, UNSUPPORTED_EVENTS, Expectation, Scenario, Turn

# what each of pipecat's agent-side events is among ours, for `absent: true` and for timing
_EVENT_KINDS = {
    **dict.fromkeys(REPLY_EVENTS, ("agent_text",)),
    "function_call": ("tool_call",),
    "bot_started_speaking": ("agent_audio_start",),
    "llm_started": ("agent_audio_start", "tool_call"),
    "bot_stopped_speaking": ("agent_audio_end", "agent_stopped"),
    "bot_interrupted": ("agent_stopped",),
    "user_started_speaking": ("vad_start",),
    "vad_user_started_speaking": ("vad_start",),
    "user_stopped_speaking": ("vad_stop",),
    "vad_user_stopped_speaking": ("vad_stop",),
    "user_transcription": ("vad_stop", "caller_dtmf"),
}


def evaluate(scenario: Scenario, result: RunResult) -> list[Check]:
    """Every expectation of `scenario` (turn by turn, then the conversation's) over `result.events`,
    then one check that the run recorded no `error` event."""
    events = sorted(result.events, key=lambda e: e.t_ms)
    checks = []
    for index, turn in enumerate(scenario.turns):
        for expectation in turn.expect:
            checks.append(_turn_check(events, index, turn, expectation))
    for expectation in scenario.expect:
        checks.append(_conversation_check(events, expectation))
    errors = [e for e in events if e.kind == "error"]
    checks.append(
        Check(
            "no errors during the call",
            not errors,
            "; ".join(f"{_ms(e.t_ms)}: {e.data.get('message', '')}" for e in errors) or "none",
        )
    )
    return checks


def evaluate_limits(scenario: Scenario, results: list[RunResult]) -> list[Check]:
    """The scenario's `limits` over the measurements of all its runs (results of other scenarios are
    passed over). Percentiles are nearest-rank: the smallest measured value with at least p% of the
    values at or below it, so the number reported was actually observed."""
    mine = [r for r in results if r.scenario == scenario.name]
    checks = []
    for key, percentiles in scenario.limits.items():
        values = [v for r in mine for v in r.measurements().get(key, [])]
        for pct, limit in percentiles.items():
            name = f"{scenario.name}: {key} {pct} <= {limit:g} ms"
            line = scenario.limit_lines.get(f"{key}.{pct}")
            if not values:
                what = (
                    "barge-ins that stopped the agent"
                    if key == "barge_in_stop_ms"
                    else "turns with agent audio"
                )
                checks.append(
                    Check(name, False, f"no measurements: {len(mine)} runs had no {what}", line=line)
                )
                continue
            value = percentile(values, float(pct.removeprefix("p")))
            detail = (
                f"{pct} {_ms(value)} over {len(values)} measurements in {len(mine)} runs; limit {limit:g} ms"
            )
            checks.append(Check(name, value <= limit, detail, value_ms=value, line=line))
    return checks


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (0 < p <= 100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# turns


def _turn_check(events: list[Event], index: int, turn: Turn, exp: Expectation) -> Check:
    label = f"turn {index + 1}: {_describe(exp)}"
    mine = [e for e in events if e.turn == index]
    anchor = turn_anchor(events, index)
    if exp.event in UNSUPPORTED_EVENTS:
        return skipped(label, f"not checked: {UNSUPPORTED_EVENTS[exp.event]}", turn=index, line=exp.line)
    if exp.absent:
        passed, detail, value = _absent(mine, exp, anchor)
    elif exp.event == "bot_started_speaking":
        passed, detail, value = _first_audio(events, index)
    elif exp.event == "bot_stopped_speaking" and turn.barges_in:
        passed, detail, value = _barge_in_stop(events, index)
    elif exp.event == "kept_text_prefix":
        passed, detail, value = _kept_text(events, index)
    elif exp.event in REPLY_EVENTS:
        passed, detail, value = _reply(mine, exp, anchor, events)
    elif exp.event == "user_transcription":
        passed, detail, value = _caller_turn(mine, turn, exp, _turn_start(mine))
    elif exp.event in _EVENT_KINDS and exp.event != "function_call":
        passed, detail, value = _agent_side(mine, exp, anchor, events)
    else:
        passed, detail, value = _happened(mine, exp, anchor, "in this turn")
    if passed and not exp.absent and exp.within_ms is not None and value is not None and value > exp.within_ms:
        passed, detail = False, f"{detail}; limit {exp.within_ms:g} ms"
    return Check(label, passed, detail, turn=index, value_ms=value, line=exp.line)


def _first_audio(events: list[Event], index: int) -> tuple[bool, str, float | None]:
    anchor = turn_anchor(events, index)
    if anchor is None:
        return (
            False,
            f"the caller's input never ended: no caller_speech_end or caller_dtmf with turn={index}",
            None,
        )
    audio = first_audio_after(events, index, anchor)
    if audio is None:
        return False, f"no agent audio after the caller's input ended at {_ms(anchor)}{_ending(events)}", None
    value = audio.t_ms - anchor
    return True, f"first audio after {_ms(value)}", value


def _barge_in_stop(events: list[Event], index: int) -> tuple[bool, str, float | None]:
    barge_in = next((e for e in events if e.kind == "barge_in" and e.turn == index), None)
    if barge_in is None:
        return False, "no barge-in: the agent was not speaking when the caller spoke", None
    stopped = stopped_after(events, barge_in.t_ms)
    if stopped is None:
        ends = [e.t_ms for e in events if e.kind == "agent_audio_end" and e.t_ms >= barge_in.t_ms]
        ran_to = (
            f"agent audio ran on to {_ms(min(ends))}"
            if ends
            else "no agent_stopped and no end of agent audio"
        )
        return False, f"the agent never stopped: {ran_to} (barge-in at {_ms(barge_in.t_ms)})", None
    value = stopped.t_ms - barge_in.t_ms
    return True, f"agent audio stopped {_ms(value)} after the barge-in", value


def _kept_text(events: list[Event], index: int) -> tuple[bool, str, None]:
    barge_in = next((e for e in events if e.kind == "barge_in" and e.turn == index), None)
    texts = [e for e in events if e.kind == "agent_text" and e.data.get("interrupted")]
    # The reply was interrupted during this turn; a runner may tag it with the turn it answered.
    text = next((e for e in texts if e.turn == index), None)
    if text is None and barge_in is not None:
        text = next((e for e in texts if e.t_ms >= barge_in.t_ms), None)
    if text is None:
        return False, "no interrupted agent_text in this turn", None
    kept, sent = _words(text.data.get("text", "")), _words(text.data.get("sent_text", ""))
    if not sent.startswith(kept):
        return False, f"kept {_quote(kept)} is not a prefix of what was being said, {_quote(sent)}", None
    return True, f"kept {_quote(kept)} of {_quote(sent)}", None


# pipecat's events within a turn


def _turn_start(mine: list[Event]) -> float | None:
    starts = [e.t_ms for e in mine if e.kind in ("caller_speech_start", "caller_dtmf", "caller_wait")]
    return min(starts) if starts else None


def spoken(event: Event) -> str:
    """What an agent_text event says the agent spoke (cut to what was heard after a barge-in)."""
    return _words(event.data.get("text", ""))


def reply_text(mine: list[Event]) -> str:
    """Everything the agent spoke in a turn, reply after reply."""
    return " ".join(t for t in (spoken(e) for e in mine if e.kind == "agent_text") if t)


def _reply(
    mine: list[Event], exp: Expectation, anchor: float | None, events: list[Event]
) -> tuple[bool, str, float | None]:
    """The agent's reply: what it spoke in this turn, with pipecat's text checks on it."""
    replies = [e for e in mine if e.kind == "agent_text" and spoken(e)]
    if not replies:
        return False, "the agent said nothing in this turn" + _ending(events), None
    needle, excluded = exp.params.get("text_contains"), exp.params.get("text_excludes")
    said, hit = "", replies[0]
    for e in replies:  # the reply so far, until it holds the wanted text (as pipecat aggregates it)
        said = f"{said} {spoken(e)}".strip()
        hit = e
        if needle is None or _words(needle) in said:
            break
    everything = reply_text(mine)
    if needle is not None and _words(needle) not in said:
        return False, f"the agent said {_quote(everything)}, which does not contain {needle!r}", None
    if excluded is not None and _words(excluded) in everything:
        return False, f"the agent said {_quote(everything)}, which contains {excluded!r}", None
    value = hit.t_ms - anchor if anchor is not None else None
    return True, f"the agent said {_quote(everything)}", value


def _caller_turn(
    mine: list[Event], turn: Turn, exp: Expectation, since: float | None
) -> tuple[bool, str, float | None]:
    """pipecat's user_transcription: the agent took the caller's turn (its VAD closed it, or the keys
    were pressed), carrying the caller's words; the agent itself writes no transcript."""
    if turn.kind == "dtmf":
        keyed = next((e for e in mine if e.kind == "caller_dtmf"), None)
        if keyed is None:
            return False, "no keys were pressed in this turn", None
        heard, text = keyed, f"DTMF: {turn.digits}"
    elif turn.kind in ("user", "audio"):
        started = next((e.t_ms for e in mine if e.kind == "caller_speech_start"), None)
        heard = next((e for e in mine if e.kind == "vad_stop" and started is not None and e.t_ms >= started), None)
        if heard is None:
            return False, "the agent never took the caller's turn: its VAD did not close a turn", None
        text = turn.text or ""
    else:
        return False, f"a {turn.kind} turn has no caller input to transcribe", None
    needle, excluded = exp.params.get("text_contains"), exp.params.get("text_excludes")
    if needle is not None and _words(needle) not in _words(text):
        what = _quote(text) if text else "no words (a WAV turn: give user: beside audio:)"
        return False, f"the caller's turn was {what}, which does not contain {needle!r}", None
    if excluded is not None and _words(excluded) in _words(text):
        return False, f"the caller's turn was {_quote(text)}, which contains {excluded!r}", None
    value = heard.t_ms - since if since is not None else None
    return True, f"the agent took the turn {_quote(text)} at {_ms(heard.t_ms)}", value


def _agent_side(
    mine: list[Event], exp: Expectation, anchor: float | None, events: list[Event]
) -> tuple[bool, str, float | None]:
    """pipecat's speaking, interruption and llm_started events, as the first of ours they map to."""
    kinds = _EVENT_KINDS[exp.event]
    user_side = exp.event.startswith(("user_", "vad_"))
    since = _turn_start(mine) if user_side else anchor
    found = [e for e in mine if e.kind in kinds and not e.data.get("already_quiet")]
    if not user_side and anchor is not None:
        found = [e for e in found if e.t_ms >= anchor]
    if exp.event == "bot_interrupted":
        found = [e for e in found if any(b.kind == "barge_in" and b.t_ms <= e.t_ms for b in mine)]
    if not found:
        return False, f"no {' or '.join(kinds)} in this turn" + _ending(events), None
    hit = found[0]
    return True, f"{hit.kind} at {_ms(hit.t_ms)}", (hit.t_ms - since if since is not None else None)


def _absent(mine: list[Event], exp: Expectation, anchor: float | None) -> tuple[bool, str, float | None]:
    """pipecat's `absent: true`: no such event in the turn (within within_ms of the anchor, if given)."""
    kinds = _EVENT_KINDS[exp.event]
    since = _turn_start(mine) if exp.event.startswith(("user_", "vad_")) else anchor
    found = [e for e in mine if e.kind in kinds and not e.data.get("already_quiet")]
    if exp.event in REPLY_EVENTS:
        found = [e for e in found if spoken(e)]
    if since is not None:
        found = [e for e in found if e.t_ms >= since]
        if exp.within_ms is not None:
            found = [e for e in found if e.t_ms - since <= exp.within_ms]
    if found:
        what = f"{found[0].kind} at {_ms(found[0].t_ms)}"
        if found[0].kind == "agent_text":
            what += f": {_quote(spoken(found[0]))}"
        return False, what, None
    return True, f"no {' or '.join(kinds)} in this turn", None


# whole conversation and events within a turn


def _conversation_check(events: list[Event], exp: Expectation) -> Check:
    passed, detail, value = _happened(events, exp, 0.0, "in the call")
    if passed and exp.within_ms is not None and value is not None and value > exp.within_ms:
        passed, detail = False, f"{detail}; limit {exp.within_ms:g} ms"
    return Check(_describe(exp), passed, detail, value_ms=value, line=exp.line)


def _happened(
    events: list[Event], exp: Expectation, since: float | None, where: str
) -> tuple[bool, str, float | None]:
    """Whether the event `exp` names is among `events`; the value is its time after `since`."""
    p = exp.params

    def after(event: Event) -> float | None:
        return event.t_ms - since if since is not None else None

    if exp.event in ("node_reached", "not_node_reached"):
        nodes = [e for e in events if e.kind == "node"]
        hit = next((e for e in nodes if e.data.get("name") == p["node"]), None)
        if exp.event == "not_node_reached":
            if hit is None:
                return True, f"never entered; nodes {where}: {_names(nodes)}", None
            return False, f"node {p['node']} entered at {_ms(hit.t_ms)}{_turn_of(hit)}", None
        if hit is None:
            return False, f"node {p['node']} never entered; nodes {where}: {_names(nodes)}", None
        return True, f"entered at {_ms(hit.t_ms)}{_turn_of(hit)}", after(hit)
    if exp.event == "function_call":
        calls = [e for e in events if e.kind == "tool_call"]
        hits: list[Event] = []
        for name, wanted in exp.calls:  # each wanted call matches a call of its own, in any order
            hit = next(
                (
                    e
                    for e in calls
                    if e not in hits
                    and (name is None or e.data.get("name") == name)
                    and _subset(wanted or {}, e.data.get("arguments") or {})
                ),
                None,
            )
            if hit is None:
                what = name or "any function"
                what += f" with arguments {wanted}" if wanted else ""
                seen = ", ".join(_call(e) for e in calls) or "none"
                return False, f"no tool_call {what}; calls {where}: [{seen}]", None
            hits.append(hit)
        last = max(hits, key=lambda e: e.t_ms)
        return True, ", ".join(f"{_call(e)} at {_ms(e.t_ms)}" for e in hits), after(last)
    if exp.event == "dtmf_sent":
        sent = [e for e in events if e.kind == "dtmf_sent"]
        digits = "".join(str(e.data.get("digits", "")) for e in sent)
        wanted = p.get("digits")
        if not sent or (wanted and wanted not in digits):
            said = f"the agent sent {digits!r}" if sent else "the agent sent no DTMF"
            return False, f"{said} {where}" + (f"; expected {wanted!r}" if wanted else ""), None
        # the event that completed the wanted digits, one event per digit or all at once
        end, done = sent[-1], ""
        for e in sent:
            done += str(e.data.get("digits", ""))
            if not wanted or wanted in done:
                end = e
                break
        return True, f"sent {digits!r}, done at {_ms(end.t_ms)}", after(end)
    if exp.event == "call_ended":
        ended = next((e for e in events if e.kind == "call_ended"), None)
        if ended is None:
            last = f"; the last event was {events[-1].kind} at {_ms(events[-1].t_ms)}" if events else ""
            return False, f"the call did not end{last}", None
        by = ended.data.get("by", "?")
        if p.get("by") and by != p["by"]:
            return (
                False,
                f"the call was ended by the {by} at {_ms(ended.t_ms)}; expected by the {p['by']}",
                None,
            )
        return True, f"ended by the {by} at {_ms(ended.t_ms)}", after(ended)
    if exp.event == "call_transferred":
        transfers = [e for e in events if e.kind == "transferred"]
        hit = next((e for e in transfers if not p.get("to") or e.data.get("to") == p["to"]), None)
        if hit is None:
            if transfers:
                seen = ", ".join(str(e.data.get("to")) for e in transfers)
                return False, f"transferred to {seen}; expected {p['to']}", None
            refused = [e for e in events if e.kind == "transfer_failed"]
            if refused:
                e = refused[0]
                return False, f"the agent asked for {e.data.get('to')} at {_ms(e.t_ms)}, but {e.data.get('reason')}", None
            return False, "the call was not transferred" + _ending(events), None
        return True, f"transferred to {hit.data.get('to')} at {_ms(hit.t_ms)}", after(hit)
    raise ValueError(f"unknown expectation event {exp.event!r}")


def _describe(exp: Expectation) -> str:
    p = exp.params
    if exp.event in ("node_reached", "not_node_reached"):
        text = f"{exp.event} {p['node']}"
    elif exp.event == "function_call":
        text = "function_call " + ", ".join(
            (name or "(any)") + (f" {args}" if args else "") for name, args in exp.calls
        )
    elif exp.event == "dtmf_sent":
        text = "dtmf_sent" + (f" {p['digits']!r}" if p.get("digits") else "")
    elif exp.event == "call_ended":
        text = "call_ended" + (f" by {p['by']}" if p.get("by") else "")
    elif exp.event == "call_transferred":
        text = "call_transferred" + (f" to {p['to']}" if p.get("to") else "")
    else:
        text = exp.event
        for key, words in (("text_contains", "contains"), ("text_excludes", "excludes")):
            if p.get(key):
                text += f" {words} {p[key]!r}"
    if exp.absent:
        text = f"no {text}"
    return text + (f" within {exp.within_ms:g} ms" if exp.within_ms is not None else "")


def _subset(wanted: Any, given: Any) -> bool:
    """`wanted` is contained in `given`: mappings key by key (recursively), anything else equal."""
    if isinstance(wanted, dict):
        return isinstance(given, dict) and all(k in given and _subset(v, given[k]) for k, v in wanted.items())
    return wanted == given


def _ending(events: list[Event]) -> str:
    ended = next((e for e in events if e.kind == "call_ended"), None)
    if ended is not None:
        return f"; the call ended at {_ms(ended.t_ms)}"
    return f"; the recording ends at {_ms(events[-1].t_ms)}" if events else "; nothing was recorded"


def _ms(value: float) -> str:
    return f"{value:.0f} ms"


def _words(text: Any) -> str:
    return " ".join(str(text).split())


def _quote(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _names(nodes: list[Event]) -> str:
    return "[" + ", ".join(str(e.data.get("name")) for e in nodes) + "]"


def _call(event: Event) -> str:
    return f"{event.data.get('name')}({event.data.get('arguments') or {}})"


def _turn_of(event: Event) -> str:
    return f" (turn {event.turn + 1})" if event.turn is not None else ""
