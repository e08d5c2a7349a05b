"""Scenario files: the conversations `chroma-agent test` plays against an agent, and what to expect.

A scenario file is a pipecat evals scripted-scenario file (`pipecat.evals.scenario`): pipecat's
`name:`, `scenarios:` (with file-level defaults, or the older single scenario at the top), `turns:`
with `user:` / `dtmf:` / `audio:` / `send_after:` or no input at all (a turn that waits for the
agent, e.g. its greeting), `expect:` with pipecat's events and checks (`text_contains`,
`text_excludes`, `calls:` / `name:` / `args:`, `eval:`, `absent:`), `judge:`, `user:`, `context:`,
`stop_on_failure:`, and `!include`. Our additions sit beside them: `agent:`, `transport:`, `runs:`,
`script:`, `limits:`, `pause_ms:` / `silence_ms:` turns, barge-in timing, and flow, DTMF, hang-up and
transfer checks. Paths are relative to the scenario file. A full example::

    name: orders                         # pipecat's file name (optional here)
    agent: ../agents/demo/agent.yaml     # optional; the CLI may override
    transport: inprocess                 # optional default: inprocess | twilio | sip | webrtc
    runs: 1                              # optional default for every scenario
    judge:                               # pipecat's judge block: who answers `eval:` checks
      eval: {service: ollama, model: gemma4:12b}
    scenarios:
      - name: order status
        runs: 5
        script: order_status_script.py:turns   # optional scripted reasoner for the tiny model
        turns:
          - expect:                                  # no caller input: wait for the greeting
              - event: response
                text_contains: "Northwind"
          - user: "Hi, I'd like to check my order."   # spoken with espeak-ng at run time
            pause_ms: 300                            # silence before this turn starts (default 0)
            expect:
              - event: bot_started_speaking          # time to first agent audio at the wire
                within_ms: 1500
              - event: response
                eval: "asks for the order number"    # put to the judge
          - audio: caller.wav                        # WAV, FLAC, OGG, MP3 (pipecat: `user:` gives its words)
          - dtmf: "1234#"                            # 0-9 * # A-D
            expect:
              - event: function_call
                calls:
                  - name: lookup_order
                    args: {order_id: "1234"}         # subset match, nested mappings too
              - event: node_reached                  # during this turn (before the next one starts)
                node: lookup_order
          - silence_ms: 2000                         # the caller says nothing for this long
          - user: "Wait, stop."
            barge_in_after_ms: 800                   # 800 ms after the agent starts speaking
            # or send_after: {event: bot_started_speaking, delay_ms: 800}   (pipecat's spelling)
            # or barge_in_at_text: "your order"      # once the agent's text so far contains it
            expect:
              - event: bot_stopped_speaking          # agent audio stops within 300 ms of the barge-in
                within_ms: 300
              - event: kept_text_prefix              # kept text is a prefix of what was being said
        expect:                                      # over the whole conversation
          - event: node_reached
            node: lookup_order
          - event: not_node_reached
            node: transfer
          - event: function_call
            name: lookup_order
            arguments: {order_id: "A17"}
          - event: dtmf_sent
            digits: "1"
          - event: call_ended
            by: agent                                # optional: agent | caller
          - event: call_transferred
            to: "+15551234567"                       # optional
        limits:                                      # over all runs: percentiles in ms
          first_audio_ms: {p50: 800, p95: 1500}
          barge_in_stop_ms: {p95: 300}

Turn-level events: ours, `bot_started_speaking` (time to first audio), `kept_text_prefix` (needs a
barge-in turn), `node_reached`, `dtmf_sent`; pipecat's, `response` / `llm_response` /
`tts_response` (all three: the text the agent spoke, which for Chroma is the model's own text stream,
cut to what the caller heard after a barge-in), `user_transcription`, `user_started_speaking` /
`user_stopped_speaking` and their `vad_` twins (the agent's VAD), `llm_started` (the agent's first
audio or tool call of the turn), `bot_stopped_speaking`, `bot_interrupted`, `function_call`.
pipecat's `function_call_stopped`, `llm_marker`, `image` and the backchannel events describe things
a speech-to-speech agent does not do: their checks are reported as skipped, with that reason.
Conversation-level: `node_reached`, `not_node_reached`, `function_call`, `dtmf_sent`, `call_ended`,
`call_transferred`.

Where pipecat's format and ours meet on a key, ours keeps its meaning:

- `within_ms` counts from the end of the turn's caller input (see `events.turn_anchor`; for a turn
  with no input, from the turn's start), or from the barge-in for `bot_stopped_speaking` on a
  barge-in turn. pipecat counts from the turn's send, which for its text turns is the same moment.
- `bot_stopped_speaking` on a barge-in turn is how fast the agent stopped; on any other turn it is
  the end of the agent's audio, as in pipecat.
- A turn's expectations are each looked for over the whole turn, in any order (pipecat's
  `check_from: turn_start` for all of them; `check_from` is accepted).
- `function_call` takes ours (`name:` + `arguments:`) and pipecat's (`name:` + `args:`, or
  `calls:`); arguments match as a subset, nested mappings too.
- `audio:` alone is a WAV the caller plays (ours); with `user:` beside it (pipecat's shape),
  `user:` is what the recording says.
- `user:` as a list of text and `pause_ms:` items (pipecat) is one stretch of speech with pauses;
  `pause_ms:` on the turn itself (ours) is silence before the turn.
- `send_after: {event: bot_started_speaking | llm_started | response, delay_ms: N}` is a barge-in
  `barge_in_after_ms: N`; `send_after: {delay_ms: N}` waits N ms once the agent is quiet.
- The caller always speaks (espeak-ng, or the turn's WAV): `user.modality` and `user.speech` are
  checked but the speech is ours. `user_transcription` is the agent's end of the caller's turn
  (its VAD) carrying the caller's scripted words (a speech-to-speech agent writes no transcript),
  or `DTMF: <keys>` for a keyed turn, as pipecat writes it.
- `judge:` is pipecat's block and its judge (`pipecat.evals.judge.EvalJudge`) answers each `eval:`;
  `judge.modality` makes no difference here (the text judged is what the agent spoke either way).
  Where the judge cannot be reached (no key, no network), each `eval:` check is reported skipped
  with the reason.
- `context:` may hold system messages only: they replace the agent's system prompt for the run.
- `stop_on_failure` is accepted; every turn is always played, and every check reported.
- Scenario names are the scenario's own `name:` (pipecat prefixes the file's name).

This module holds what a file is read into (`ScenarioFile`, `Scenario`, `Turn`, `Expectation`) and the
events a check may name; `agent.testing.pipecat_evals` reads and checks the file
(`load_scenarios`, `find_scenario_files`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.problems import FlowFileError

# The *-outbound lines turn a scenario round: the agent places the call and the turns are the callee's.
TRANSPORTS = ("inprocess", "twilio", "sip", "webrtc", "sip-outbound", "twilio-outbound")
LIMIT_KEYS = ("first_audio_ms", "barge_in_stop_ms")
PERCENTILES = ("p50", "p95")
DTMF = re.compile(r"[0-9*#A-D]+")

# pipecat's reply events: for Chroma all three are the text the agent spoke
REPLY_EVENTS = ("response", "llm_response", "tts_response")
# pipecat events a speech-to-speech agent has no counterpart for: reported as skipped, with why
UNSUPPORTED_EVENTS = {
    "function_call_stopped": "the agent reports when a tool call starts, not how it ended",
    "llm_marker": "a speech-to-speech model writes no turn-completion markers",
    "image": "the agent outputs no images",
    "bot_backchannel": "the agent has no backchannel events",
    "user_backchannel": "the agent has no backchannel events",
}
# send_after events that mean "once the agent has started its reply": a barge-in
BARGE_IN_ANCHORS = ("bot_started_speaking", "llm_started", *REPLY_EVENTS)


@dataclass(frozen=True)
class _EventRule:
    turn: bool  # allowed in a turn's expect
    conversation: bool  # allowed in a scenario's expect
    params: dict[str, str]  # key -> kind of value: "string", "dtmf", "mapping", "by", "text", "calls"
    required: tuple[str, ...] = ()
    within: bool = True  # takes within_ms
    barge_in: bool = False  # only on a turn that barges in
    absent: bool = False  # takes pipecat's `absent: true`


_TEXT = {"text_contains": "text", "text_excludes": "text"}
_CALL = {"name": "string", "arguments": "mapping", "args": "mapping", "calls": "calls", "eval": "text"}

EVENTS: dict[str, _EventRule] = {
    "bot_started_speaking": _EventRule(turn=True, conversation=False, params={}, absent=True),
    "bot_stopped_speaking": _EventRule(turn=True, conversation=False, params={}, absent=True),
    "kept_text_prefix": _EventRule(turn=True, conversation=False, params={}, within=False, barge_in=True),
    "function_call": _EventRule(turn=True, conversation=True, params=_CALL, absent=True),
    "node_reached": _EventRule(turn=True, conversation=True, params={"node": "string"}, required=("node",)),
    "dtmf_sent": _EventRule(turn=True, conversation=True, params={"digits": "dtmf"}),
    "call_ended": _EventRule(turn=False, conversation=True, params={"by": "by"}),
    "call_transferred": _EventRule(turn=False, conversation=True, params={"to": "string"}),
    "not_node_reached": _EventRule(
        turn=False, conversation=True, params={"node": "string"}, required=("node",), within=False
    ),
    **{
        name: _EventRule(turn=True, conversation=False, params={**_TEXT, "eval": "text"}, absent=True)
        for name in (*REPLY_EVENTS, "user_transcription")
    },
    **{
        name: _EventRule(turn=True, conversation=False, params={}, absent=True)
        for name in (
            "user_started_speaking",
            "user_stopped_speaking",
            "vad_user_started_speaking",
            "vad_user_stopped_speaking",
            "llm_started",
            "bot_interrupted",
        )
    },
    **{
        name: _EventRule(
            turn=True,
            conversation=False,
            params={
                **_TEXT,
                **_CALL,
                "marker": "any",
                "marker_first": "any",
                "markers": "any",
                "text_after": "any",
            },
            absent=True,
        )
        for name in UNSUPPORTED_EVENTS
    },
}


class ScenarioFileError(FlowFileError):
    """A bad scenario file; str() is every problem, one per line: `file:line: field: message`."""


@dataclass
class Expectation:
    event: str  # one of EVENTS
    # the event's own keys: name, arguments (pipecat's args), calls, node, digits, by, to,
    # text_contains, text_excludes, eval
    params: dict[str, Any]
    within_ms: float | None = None
    line: int = 0
    absent: bool = False  # pipecat's `absent: true`: no such event in the turn

    @property
    def calls(self) -> list[tuple[str | None, dict | None]]:
        """A function_call's calls, each (name, arguments); None matches any."""
        return self.params.get("calls") or [(self.params.get("name"), self.params.get("arguments"))]


@dataclass
class Turn:
    kind: str  # "user" | "audio" | "dtmf" | "silence" | "wait" (no caller input: the agent speaks)
    text: str | None = None  # kind "user" (spoken with espeak-ng at run time), or what an audio turn says
    wav: Path | None = None  # kind "audio": absolute; any format processors.audio_io reads
    digits: str | None = None  # kind "dtmf"
    silence_ms: float | None = None  # kind "silence"
    pause_ms: float = 0.0  # silence before the turn starts
    barge_in_after_ms: float | None = None  # start this long after the agent starts speaking
    barge_in_at_text: str | None = None  # start once the agent's text so far contains this
    expect: list[Expectation] = field(default_factory=list)
    line: int = 0
    parts: list[str | float] | None = None  # kind "user" with pauses: text, or ms of silence

    @property
    def barges_in(self) -> bool:
        return self.barge_in_after_ms is not None or self.barge_in_at_text is not None


@dataclass
class Scenario:
    name: str
    runs: int
    turns: list[Turn]
    expect: list[Expectation] = field(default_factory=list)
    limits: dict[str, dict[str, float]] = field(default_factory=dict)  # {"first_audio_ms": {"p95": 1500}}
    script: tuple[Path, str] | None = None  # (module file, attribute) of a scripted reasoner
    line: int = 0
    limit_lines: dict[str, int] = field(default_factory=dict)  # "first_audio_ms.p95" -> line
    judge: dict | None = None  # pipecat's `judge.eval` block, as pipecat parsed it
    system_prompt: str | None = None  # from `context:`: replaces the agent's for the run


@dataclass
class ScenarioFile:
    path: Path
    agent: Path | None
    transport: str | None
    scenarios: list[Scenario]
    name: str | None = None  # pipecat's file `name:`
