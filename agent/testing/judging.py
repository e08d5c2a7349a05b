"""`eval:` checks: natural-language criteria put to the LLM judge the scenario file configures.

The judge is pipecat's own (`pipecat.evals.judge.EvalJudge`, built from the file's `judge.eval`
block by `EvalJudge.from_config`, Ollama on localhost by default), asked the questions pipecat's
evals ask: a reply's criterion over the conversation so far (`evaluate`), a function call's over its
name and arguments (`evaluate_call`). It is fed what the run recorded, in time order: the caller's
words (`DTMF: <keys>` for keys), the text the agent spoke (the model's own text stream, cut to what
the caller heard after a barge-in), and its tool calls.

A judge that cannot be reached (its service cannot be built, e.g. no API key; nothing answers at its
address; it refuses the key) decides nothing: each `eval:` check is reported skipped, with the
reason, never passed. A judge that answers badly fails the check, as in pipecat ("judge call failed").
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

from loguru import logger

from .events import Check, Event, RunResult, skipped
from .expect import reply_text, spoken
from .scenario import REPLY_EVENTS, Expectation, Scenario

PROBE_SECS = 3.0  # to open a connection to the judge's address
CHECK_SECS = 180.0  # one check at most: pipecat's own limits are 10 s per question and 60 s per reason, each tried twice


async def judge_checks(scenario: Scenario, result: RunResult) -> list[Check]:
    """One check per `eval:` of the scenario, over `result.events`."""
    wanted = [
        (index, exp)
        for index, turn in enumerate(scenario.turns)
        for exp in turn.expect
        if exp.params.get("eval") and not exp.absent
    ] + [(None, exp) for exp in scenario.expect if exp.params.get("eval")]
    if not wanted:
        return []
    judge, unreachable = await open_judge(scenario.judge)
    if judge is None:
        return [skipped(_label(i, e), f"not judged: {unreachable}", turn=i, line=e.line) for i, e in wanted]
    events = sorted(result.events, key=lambda e: e.t_ms)
    conversation = _Conversation(judge, events)
    checks = []
    try:
        for index, exp in wanted:
            conversation.feed_through(index)
            mine = [e for e in events if index is None or e.turn == index]
            try:
                check = await asyncio.wait_for(_judged(judge, index, exp, mine), CHECK_SECS)
            except TimeoutError:
                check = Check(_label(index, exp), False, f"the judge gave no verdict within {CHECK_SECS:g} s")
                check.turn, check.line = index, exp.line
            checks.append(check)
    finally:
        try:
            await judge.close()
        except Exception as exc:
            logger.warning(f"closing the judge failed: {exc}")
    return checks


async def open_judge(config: dict | None) -> tuple[Any, str]:
    """(pipecat's EvalJudge, "") for a judge that answers at its address, else (None, why not)."""
    from pipecat.evals.judge import EvalJudge

    try:
        judge = EvalJudge.from_config(config)
    except Exception as exc:  # a provider's client refuses to start without its key; a factory failed
        return None, f"the judge could not be set up ({type(exc).__name__}: {exc})"
    url = _address(judge)
    if url is not None:
        problem = await _probe(url)
        if problem is not None:
            await judge.close()
            return None, f"no judge reachable at {url}: {problem}"
    _watch(judge)
    return judge, ""


class _Conversation:
    """Feeds the judge what happened, in time order, up to the end of the turn being judged."""

    def __init__(self, judge: Any, events: list[Event]):
        self.judge, self.events, self.fed = judge, events, 0

    def feed_through(self, turn: int | None) -> None:
        starts = [e.t_ms for e in self.events if _is_caller(e) and turn is not None and e.turn == turn + 1]
        end = min(starts) if starts else float("inf")
        while self.fed < len(self.events) and self.events[self.fed].t_ms < end:
            event = self.events[self.fed]
            self.fed += 1
            if event.kind == "caller_speech_start" and not event.data.get("silence"):
                self.judge.add_user_message(event.data.get("text") or "(the caller played a recording)")
            elif event.kind == "caller_dtmf":
                self.judge.add_user_message(f"DTMF: {event.data.get('digits', '')}")
            elif event.kind == "agent_text":
                self.judge.add_assistant_message(spoken(event))
            elif event.kind == "tool_call":
                arguments = json.dumps(event.data.get("arguments") or {}, sort_keys=True, default=str)
                self.judge.add_tool_call(f"{event.data.get('name')}({arguments})")


async def _judged(judge: Any, index: int | None, exp: Expectation, mine: list[Event]) -> Check:
    label, criterion = _label(index, exp), exp.params["eval"]

    def check(passed: bool, detail: str) -> Check:
        return Check(label, passed, detail, turn=index, line=exp.line)

    if exp.event in REPLY_EVENTS:
        said = reply_text(mine)
        if not said:
            return check(False, "the agent said nothing in this turn to judge")
        judge.classifier.chroma_last_error = None
        verdict = await judge.evaluate(criterion)
        outcome = _outcome(judge, verdict)
        if outcome is not None:
            return skipped(label, outcome, turn=index, line=exp.line)
        if verdict.verdict == "yes":
            return check(True, f"the judge said yes ({verdict.reason}) to {_quote(said)}")
        if verdict.verdict == "continue":
            return check(False, f"the judge found the reply unfinished ({verdict.reason}): {_quote(said)}")
        return check(False, f"the judge said no: {verdict.reason}; the agent said {_quote(said)}")
    if exp.event == "function_call":
        calls = [e for e in mine if e.kind == "tool_call"]
        matched = [
            e
            for e in calls
            if any(name is None or e.data.get("name") == name for name, _args in exp.calls)
        ]
        if not matched:
            seen = ", ".join(str(e.data.get("name")) for e in calls) or "none"
            return check(False, f"no matching tool_call to judge; calls: [{seen}]")
        verdicts = []
        for call in matched:
            name, arguments = call.data.get("name"), call.data.get("arguments") or {}
            judge.classifier.chroma_last_error = None
            verdict = await judge.evaluate_call(name, arguments, criterion)
            outcome = _outcome(judge, verdict)
            if outcome is not None:
                return skipped(label, outcome, turn=index, line=exp.line)
            verdicts.append(f"{name}({arguments}): {verdict.verdict} ({verdict.reason})")
            if not verdict.passed:
                return check(False, f"the judge said no to {'; '.join(verdicts[-1:])}")
        return check(True, "the judge said " + "; ".join(verdicts))
    reason = "pipecat judges only the agent's replies and function calls"
    return skipped(label, f"not judged: {reason}, not {exp.event}", turn=index, line=exp.line)


def _label(index: int | None, exp: Expectation) -> str:
    where = f"turn {index + 1}: " if index is not None else ""
    return f"{where}{exp.event} eval {exp.params['eval']!r}"


def _is_caller(event: Event) -> bool:
    return event.kind in ("caller_speech_start", "caller_dtmf", "caller_wait")


# reaching the judge


def _address(judge: Any) -> str | None:
    """The base URL of an OpenAI-compatible judge (pipecat's Ollama and OpenAI services), if it has one."""
    llm = getattr(judge.classifier, "llm", None)
    client = getattr(llm, "_client", None)  # the service's openai client: no public accessor
    url = getattr(client, "base_url", None)
    return str(url) if url else None


async def _probe(url: str) -> str | None:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, port), PROBE_SECS)
    except TimeoutError:
        return f"no answer within {PROBE_SECS:g} s"
    except OSError as exc:
        return exc.strerror or str(exc)
    writer.close()
    return None


def _watch(judge: Any) -> None:
    """Keep the last error of the judge's classifier: pipecat's judge turns every failed question into
    "judge call failed", and only the error tells an unreachable judge from a wrong answer."""
    classifier = judge.classifier
    classifier.chroma_last_error = None
    for method in ("choice", "yes_no"):
        original = getattr(classifier, method)

        async def watched(*args, _original=original, **kwargs):
            try:
                return await _original(*args, **kwargs)
            except Exception as exc:
                classifier.chroma_last_error = exc
                raise

        setattr(classifier, method, watched)


def _outcome(judge: Any, verdict: Any) -> str | None:
    """Why a verdict is no verdict at all (the judge could not be reached), or None."""
    if verdict.reason != "judge call failed":
        return None
    error = getattr(judge.classifier, "chroma_last_error", None)
    cause = error
    while cause is not None:
        if _unreachable(cause):
            return f"not judged: the judge could not be reached ({type(cause).__name__}: {cause})"
        cause = cause.__cause__ or cause.__context__
    return None


def _unreachable(exc: BaseException) -> bool:
    try:
        import openai
    except ImportError:
        openai = None
    if openai is not None and isinstance(
        exc, openai.APIConnectionError | openai.AuthenticationError | openai.PermissionDeniedError
    ):
        return True
    return isinstance(exc, ConnectionError)


def _quote(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")
