"""Playing a scenario against a live agent over a transport, and recording what happened.

One run: load the agent (the model once per process), dial it over the chosen line, play the caller's
turns (speech, WAVs, keys, silences, barge-ins timed from what the line hears), wait for the agent to
answer the last one, hang up, then turn what both ends saw into timed events:

- at the wire (the caller's end): the agent's audio, as runs of sound split by 0.3 s of quiet
  (`agent_audio_start`/`_end`), and where each barge-in made it stop (`agent_stopped`);
- at the agent (`Call.timeline`, same clock): its VAD's turns, tool calls, flow nodes, the text it
  kept of each reply, DTMF it sent, a transfer, its hang-up.

The expectations (expect.py) are then checked over those events.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
from loguru import logger

from flows.tools import forget_local_modules

from ..runtime import AgentRuntime, model_source
from ..spec import load_agent
from .events import Event, RunResult
from .expect import evaluate
from .judging import judge_checks
from .lines import LINES, SLOT, Line
from .scenario import Scenario, ScenarioFile, Turn
from .speech import read_wav, synthesize

REPLY_BREAK_SECS = 0.3  # quiet that separates two agent replies at the wire
QUIET_SECS = 0.6  # the agent is done answering once nothing has happened for this long
TURN_TIMEOUT_SECS = 45.0
WAIT_SECS = 15.0  # a turn without caller input waits this long for the agent to start (unless its within_ms says)


class ScenarioRunner:
    """Runs scenarios; models are loaded once per process and shared by every run."""

    def __init__(self, *, agent: Path | None = None, model: str | None = None):
        self.agent = agent
        self.model_override = model
        self._models: dict[str, object] = {}

    def model_for(self, spec):
        from processors.chroma.checkpoint import load_model

        source = model_source(spec.model_source)
        if source not in self._models:
            device = None if spec.device == "auto" else spec.device
            self._models[source] = load_model(source, device=device)
        return self._models[source]

    def agent_path(self, file: ScenarioFile) -> Path:
        path = self.agent or file.agent
        if path is None:
            raise ValueError(f"{file.path}: no agent to call; give `agent:` in the file or --agent")
        return Path(path)

    async def run(self, file: ScenarioFile, scenario: Scenario, transport: str, run: int) -> RunResult:
        started = time.monotonic()
        result = RunResult(scenario.name, str(file.path), transport, run, events=[])
        line: Line | None = None
        caller_events: list[Event] = []
        error = None
        try:
            # Every run starts as the first did: state a run left in the flow's own tool modules (a slot
            # it booked) must not steer the next.
            forget_local_modules()
            spec = load_agent(self.agent_path(file), model=self.model_override)
            if scenario.system_prompt is not None:  # the scenario's `context:`
                spec = spec.model_copy(update={"system_prompt": scenario.system_prompt})
            model = self.model_for(spec)
            line_class = LINES.get(transport)
            if line_class is None:
                raise ValueError(f"transport {transport!r}: expected one of {', '.join(LINES)}")
            runtime = AgentRuntime(line_class.adapt(spec), model=model, reasoner=_reasoner(scenario, model))
            line = line_class(runtime)
            await line.open()
            await _play(line, scenario, caller_events)
            await _quiet(line, settle=max(QUIET_SECS, spec.turn.silence_secs + 0.3))
        except Exception as exc:
            logger.opt(exception=exc).debug("scenario run failed")
            error = f"{type(exc).__name__}: {exc}"
        if line is not None:
            ended_by_agent, end_s = line.ended, line.now()
            try:
                await line.close()
            except Exception:
                logger.warning("closing the line after the run failed:\n" + traceback.format_exc())
            if line.call is not None:
                result.events = _events(line, scenario, caller_events, ended_by_agent, end_s)
                result.record_id = line.call.record_id  # the call's record, named in the reports
            try:
                await line.runtime.close()  # its record written before the next run
            except Exception:
                logger.warning("closing the run's records failed:\n" + traceback.format_exc())
        if error is not None:
            result.error = error
            t_ms = 1000 * line.now() if line is not None else 0.0
            result.events.append(Event(t_ms, "error", None, {"message": error}))
        result.checks = evaluate(scenario, result)
        result.checks[-1:-1] = await judge_checks(scenario, result)  # before "no errors during the call"
        result.duration_ms = 1000 * (time.monotonic() - started)
        return result


def _reasoner(scenario: Scenario, model) -> Callable | None:
    """The scenario's scripted thinker (`script: file.py:turns`), one per call, for the tiny model's random
    weights; with real weights the script is ignored and the thinker answers for itself."""
    if scenario.script is None or not model.config.is_tiny:
        return None  # real weights choose their own words
    from processors.chroma.scripted import ScriptedReasoner

    path, attribute = scenario.script
    spec = importlib.util.spec_from_file_location(f"_chroma_scenario_script_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    turns = getattr(module, attribute, None)
    if not isinstance(turns, list):
        raise ValueError(f"{path}: {attribute} is {type(turns).__name__}; expected a list of scripted turns")
    return lambda: ScriptedReasoner(model.tokenizer, turns)


# -- playing the caller's side -------------------------------------------------------------------


async def _play(line: Line, scenario: Scenario, events: list[Event]) -> None:
    """The caller's turns, noted in `events` as they happen (kept when a turn fails)."""

    def note(t: float, kind: str, turn: int, **data) -> None:
        events.append(Event(1000 * t, kind, turn, data))

    last_caller = 0.0  # line seconds when the caller last acted
    for index, turn in enumerate(scenario.turns):
        if line.ended:
            break
        if turn.kind == "wait":
            # The first turn starts with the call, so that the greeting is this turn's.
            if index > 0:
                await _quiet(line)
            since = line.now() if index > 0 else 0.0
            note(since, "caller_wait", index)
            await _agent_acts(line, since, _wait_secs(turn))
            await _quiet(line)
            continue
        if not turn.barges_in:
            await _quiet(line)
        if turn.pause_ms:
            await asyncio.sleep(turn.pause_ms / 1000)
        if turn.kind in ("user", "audio"):
            pcm = _speech(turn, line.rate) if turn.kind == "user" else read_wav(turn.wav, line.rate)
            if turn.barges_in:
                await _barge_in_moment(line, turn, since=last_caller)
            data = {"text": turn.text} if turn.kind == "user" else {"wav": str(turn.wav)}
            if turn.kind == "audio" and turn.text:
                data["text"] = turn.text  # what the recording says (pipecat's user: beside audio:)
            start, end = await line.say(pcm)
            note(start, "caller_speech_start", index, **data)
            if turn.barges_in:
                note(start, "barge_in", index)
            note(end, "caller_speech_end", index, **data)
            last_caller = end
        elif turn.kind == "dtmf":
            # Stamped at the last key, as speech is at its end: the agent can only act once the
            # input is complete ("1234#"), so the keys before it are not the agent's latency.
            if len(turn.digits) > 1:
                await line.press(turn.digits[:-1])
            note(line.now(), "caller_dtmf", index, digits=turn.digits)
            await line.press(turn.digits[-1])
            last_caller = line.now()
        elif turn.kind == "silence":
            note(line.now(), "caller_speech_start", index, silence=True)
            await asyncio.sleep(turn.silence_ms / 1000)
            note(line.now(), "caller_speech_end", index, silence=True)
            last_caller = line.now()


def _speech(turn: Turn, rate: int) -> np.ndarray:
    """The caller's words, with pipecat's `pause_ms` silences between them when the turn has them."""
    if turn.parts is None:
        return synthesize(turn.text, rate)
    pieces = [
        synthesize(part, rate) if isinstance(part, str) else np.zeros(int(rate * part / 1000), np.int16)
        for part in turn.parts
    ]
    return np.concatenate(pieces)


def _wait_secs(turn: Turn) -> float:
    limits = [e.within_ms / 1000 for e in turn.expect if e.within_ms is not None]
    return max(limits) if limits else WAIT_SECS


async def _agent_acts(line: Line, since: float, timeout: float) -> None:
    """Wait until the agent does something after `since` (speaks, generates, calls a tool), the call
    ends, or `timeout` seconds pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline and not line.ended:
        heard = any(is_loud and t >= since for t, is_loud in line.heard())
        timeline = line.call.timeline if line.call is not None else []
        did = any(kind in ("agent_text", "tool_call") and t - line.t0 >= since for t, kind, _ in timeline)
        if heard or did or line.agent_busy():
            return
        await asyncio.sleep(0.02)


async def _barge_in_moment(line: Line, turn: Turn, since: float) -> None:
    """Wait for the moment a barge-in turn starts: `barge_in_after_ms` after the agent's audio starts
    (at the wire), or once the agent's text so far contains `barge_in_at_text`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TURN_TIMEOUT_SECS
    if turn.barge_in_at_text is not None:
        while loop.time() < deadline and not line.ended:
            service = line.call.service if line.call else None
            if service is not None and service.speaking and turn.barge_in_at_text in service.sent_text:
                return
            await asyncio.sleep(0.01)
        raise TimeoutError(f"the agent never said {turn.barge_in_at_text!r} to barge in at")
    started = None
    while loop.time() < deadline and not line.ended:
        started = next((t for t, is_loud in line.heard() if is_loud and t >= since), None)
        if started is not None:
            break
        await asyncio.sleep(0.01)
    if started is None:
        raise TimeoutError(f"the agent did not start speaking within {TURN_TIMEOUT_SECS:g} s to barge in on")
    await asyncio.sleep(max(0.0, started + turn.barge_in_after_ms / 1000 - line.now()))


async def _quiet(line: Line, settle: float = QUIET_SECS, timeout: float = TURN_TIMEOUT_SECS) -> None:
    """Wait until the agent has had nothing to do for `settle` seconds (or the call ended)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    quiet_since = None
    while loop.time() < deadline and not line.ended:
        if line.agent_busy():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = loop.time()
        elif loop.time() - quiet_since >= settle:
            return
        await asyncio.sleep(0.02)


# -- events ----------------------------------------------------------------------------------------------------


def _events(line: Line, scenario: Scenario, caller: list[Event], ended_by_agent: bool, end_s: float) -> list[Event]:
    starts = sorted(
        (e.t_ms, e.turn) for e in caller if e.kind in ("caller_speech_start", "caller_dtmf", "caller_wait")
    )

    def turn_at(t_ms: float) -> int | None:
        turn = None
        for start, index in starts:
            if start <= t_ms:
                turn = index
        return turn

    events = list(caller)
    replies = _replies(line.heard())
    for start, end in replies:
        events.append(Event(1000 * start, "agent_audio_start", turn_at(1000 * start)))
        events.append(Event(1000 * end, "agent_audio_end", turn_at(1000 * start)))
    for barge in (e for e in caller if e.kind == "barge_in"):
        b = barge.t_ms / 1000
        spanning = [end for start, end in replies if start <= b <= end + SLOT]
        stopped = max(b, spanning[0]) if spanning else b
        events.append(Event(1000 * stopped, "agent_stopped", barge.turn, {} if spanning else {"already_quiet": True}))
    for t, kind, data in list(line.call.timeline) if line.call is not None else []:
        t_ms = 1000 * (t - line.t0)
        mapped = _agent_event(kind, data)
        if mapped is not None:
            events.append(Event(t_ms, mapped[0], turn_at(t_ms), mapped[1]))
    if line.call is not None and line.call.transferred_to and not any(e.kind == "transferred" for e in events):
        events.append(Event(1000 * end_s, "transferred", turn_at(1000 * end_s), {"to": line.call.transferred_to}))
    if ended_by_agent:
        events.append(Event(1000 * end_s, "call_ended", turn_at(1000 * end_s), {"by": "agent"}))
    else:
        events.append(Event(1000 * end_s, "call_ended", None, {"by": "caller"}))
    return sorted(events, key=lambda e: e.t_ms)


def _agent_event(kind: str, data: dict) -> tuple[str, dict] | None:
    if kind == "user_speaking":
        return ("vad_start" if data.get("speaking") else "vad_stop"), {}
    if kind == "agent_text":
        return "agent_text", dict(data)
    if kind in ("tool_call", "node", "dtmf_sent", "transferred", "transfer_failed"):
        return kind, dict(data)
    return None


def _replies(heard: list[tuple[float, bool]]) -> list[tuple[float, float]]:
    """(start, end) seconds of each run of agent sound, runs split by REPLY_BREAK_SECS of quiet."""
    runs: list[list[float]] = []
    for t, is_loud in heard:
        if not is_loud:
            continue
        if runs and t - runs[-1][1] <= REPLY_BREAK_SECS:
            runs[-1][1] = t + SLOT
        else:
            runs.append([t, t + SLOT])
    return [(a, b) for a, b in runs]
