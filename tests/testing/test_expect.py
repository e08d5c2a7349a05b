import dataclasses
import textwrap

import pytest

from agent.testing.events import Check, Event, RunResult
from agent.testing.expect import evaluate, evaluate_limits, percentile
from agent.testing.pipecat_evals import load_scenarios
from agent.testing.scenario import Scenario, Turn

SCENARIO = """
scenarios:
  - name: order status
    turns:
      - user: "Hi, I'd like to check my order."
        expect:
          - event: bot_started_speaking
            within_ms: 800
      - dtmf: "17#"
        expect:
          - event: node_reached
            node: lookup_order
          - event: function_call
            name: lookup_order
      - user: "Wait, stop."
        barge_in_after_ms: 500
        expect:
          - event: bot_stopped_speaking
            within_ms: 300
          - event: kept_text_prefix
      - silence_ms: 2000
        expect:
          - event: bot_started_speaking
    expect:
      - event: node_reached
        node: wrap_up
      - event: not_node_reached
        node: voicemail
      - event: function_call
        name: lookup_order
        arguments: {order_id: "A17", options: {express: true}}
      - event: dtmf_sent
        digits: "1"
      - event: call_transferred
        to: "+15551234567"
      - event: call_ended
        by: agent
"""

SENT = "Your order A17 is on its way and arrives on Friday."


def conversation() -> list[Event]:
    """A call that meets every expectation of SCENARIO: first audio 600, 700, 500 and 1200 ms,
    and one barge-in that stopped the agent after 200 ms."""
    return [
        Event(0, "caller_speech_start", 0, {"text": "Hi, I'd like to check my order."}),
        Event(150, "vad_start", 0),
        Event(1500, "caller_speech_end", 0),
        Event(1700, "vad_stop", 0),
        Event(2100, "agent_audio_start", 0),
        Event(3500, "agent_audio_end", 0),
        Event(4000, "caller_dtmf", 1, {"digits": "17#"}),
        Event(4100, "node", 1, {"name": "lookup_order"}),
        Event(
            4200,
            "tool_call",
            1,
            {
                "name": "lookup_order",
                "arguments": {"order_id": "A17", "options": {"express": True, "slot": 2}},
            },
        ),
        Event(4700, "agent_audio_start", 1),
        Event(5200, "caller_speech_start", 2, {"text": "Wait, stop."}),
        Event(5200, "barge_in", 2),
        Event(5400, "agent_stopped", 2),
        Event(5400, "agent_text", 2, {"text": "Your order A17 is", "interrupted": True, "sent_text": SENT}),
        Event(6000, "caller_speech_end", 2),
        Event(6500, "agent_audio_start", 2),
        Event(6600, "dtmf_sent", 2, {"digits": "1"}),
        Event(7500, "agent_audio_end", 2),
        Event(7600, "caller_speech_start", 3, {"silence": True}),
        Event(8800, "agent_audio_start", 3),
        Event(9500, "agent_audio_end", 3),
        Event(9600, "caller_speech_end", 3, {"silence": True}),
        Event(9650, "node", 3, {"name": "wrap_up"}),
        Event(9700, "transferred", 3, {"to": "+15551234567"}),
        Event(9800, "call_ended", 3, {"by": "agent"}),
    ]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Scenario:
    path = tmp_path_factory.mktemp("expect") / "calls.yaml"
    path.write_text(textwrap.dedent(SCENARIO).lstrip("\n"))
    return load_scenarios(path).scenarios[0]


def run(events: list[Event], name: str = "order status", n: int = 1) -> RunResult:
    return RunResult(scenario=name, file="calls.yaml", transport="inprocess", run=n, events=events)


def only_failure(scenario: Scenario, events: list[Event]) -> Check:
    checks = evaluate(scenario, run(events))
    failed = [c for c in checks if not c.passed]
    assert len(failed) == 1, [(c.name, c.detail) for c in failed]
    return failed[0]


def changed(which: str, at: float | None = None, remove: bool = False, **changes) -> list[Event]:
    """conversation() with its first `which` event (at `at` ms, when given) changed, or removed."""
    events = conversation()
    i = next(i for i, e in enumerate(events) if e.kind == which and (at is None or e.t_ms == at))
    if remove:
        del events[i]
    else:
        events[i] = dataclasses.replace(events[i], **changes)
    return events


def test_a_run_that_meets_every_expectation_passes(scenario):
    result = run(conversation())
    result.checks = evaluate(scenario, result)
    assert result.passed, [(c.name, c.detail) for c in result.checks if not c.passed]
    names = [c.name for c in result.checks]
    assert names == [
        "turn 1: bot_started_speaking within 800 ms",
        "turn 2: node_reached lookup_order",
        "turn 2: function_call lookup_order",
        "turn 3: bot_stopped_speaking within 300 ms",
        "turn 3: kept_text_prefix",
        "turn 4: bot_started_speaking",
        "node_reached wrap_up",
        "not_node_reached voicemail",
        "function_call lookup_order {'order_id': 'A17', 'options': {'express': True}}",
        "dtmf_sent '1'",
        "call_transferred to +15551234567",
        "call_ended by agent",
        "no errors during the call",
    ]
    first, *_ = result.checks
    assert (first.turn, first.value_ms, first.detail, first.line) == (0, 600.0, "first audio after 600 ms", 6)
    assert result.checks[3].value_ms == 200.0
    assert result.checks[5].value_ms == 1200.0  # from the start of the silence
    assert result.checks[6].value_ms == 9650.0  # conversation level: from the start of the call
    assert result.measurements() == {
        "first_audio_ms": [600.0, 700.0, 500.0, 1200.0],
        "barge_in_stop_ms": [200.0],
    }


def test_too_slow_first_audio(scenario):
    failed = only_failure(scenario, changed("agent_audio_start", 2100, t_ms=2500))
    assert failed.name == "turn 1: bot_started_speaking within 800 ms"
    assert failed.detail == "first audio after 1000 ms; limit 800 ms"
    assert (failed.value_ms, failed.turn) == (1000.0, 0)


def test_no_first_audio_says_what_happened_instead(scenario):
    events = [e for e in conversation() if not (e.kind.startswith("agent_audio") and e.turn == 0)]
    failed = only_failure(scenario, events)
    assert failed.name == "turn 1: bot_started_speaking within 800 ms"
    assert (
        failed.detail == "no agent audio after the caller's input ended at 1500 ms; the call ended at 9800 ms"
    )


def test_the_agent_never_stopped(scenario):
    events = changed("agent_stopped", kind="agent_audio_end", t_ms=5900)
    failed = only_failure(scenario, events)
    assert failed.name == "turn 3: bot_stopped_speaking within 300 ms"
    assert failed.detail == "the agent never stopped: agent audio ran on to 5900 ms (barge-in at 5200 ms)"


def test_the_agent_stopped_too_late(scenario):
    failed = only_failure(scenario, changed("agent_stopped", t_ms=5650))
    assert failed.name == "turn 3: bot_stopped_speaking within 300 ms"
    assert failed.detail == "agent audio stopped 450 ms after the barge-in; limit 300 ms"
    assert failed.value_ms == 450.0


def test_wrong_tool_arguments_list_the_calls_seen(scenario):
    failed = only_failure(
        scenario, changed("tool_call", data={"name": "lookup_order", "arguments": {"order_id": "B2"}})
    )
    assert failed.name == "function_call lookup_order {'order_id': 'A17', 'options': {'express': True}}"
    assert failed.detail == (
        "no tool_call lookup_order with arguments {'order_id': 'A17', 'options': {'express': True}}; "
        "calls in the call: [lookup_order({'order_id': 'B2'})]"
    )


def test_nested_arguments_must_match_too(scenario):
    args = {"order_id": "A17", "options": {"express": False}}
    failed = only_failure(scenario, changed("tool_call", data={"name": "lookup_order", "arguments": args}))
    assert failed.name.startswith("function_call lookup_order")


def test_node_not_reached(scenario):
    failed = only_failure(scenario, changed("node", 9650, remove=True))
    assert failed.name == "node_reached wrap_up"
    assert failed.detail == "node wrap_up never entered; nodes in the call: [lookup_order]"


def test_a_node_reached_in_a_later_turn_fails_the_turns_expectation(scenario):
    failed = only_failure(scenario, changed("node", 4100, turn=2, t_ms=5300))
    assert failed.name == "turn 2: node_reached lookup_order"
    assert failed.detail == "node lookup_order never entered; nodes in this turn: []"


def test_a_node_that_must_not_be_reached(scenario):
    events = [*conversation(), Event(9660, "node", 3, {"name": "voicemail"})]
    failed = only_failure(scenario, events)
    assert failed.name == "not_node_reached voicemail"
    assert failed.detail == "node voicemail entered at 9660 ms (turn 4)"


def test_kept_text_not_a_prefix(scenario):
    data = {"text": "Your order B17", "interrupted": True, "sent_text": SENT}
    failed = only_failure(scenario, changed("agent_text", data=data))
    assert failed.name == "turn 3: kept_text_prefix"
    assert failed.detail == f"kept 'Your order B17' is not a prefix of what was being said, {SENT!r}"


def test_kept_text_may_be_all_that_was_sent_when_nothing_was_left_unplayed(scenario):
    # "sent" is what the agent had generated when it was cut; a line with no playout buffer plays all of it
    data = {"text": SENT, "interrupted": True, "sent_text": SENT}
    assert all(c.passed for c in evaluate(scenario, run(changed("agent_text", data=data))))


def test_call_not_ended(scenario):
    failed = only_failure(scenario, changed("call_ended", remove=True))
    assert failed.name == "call_ended by agent"
    assert failed.detail == "the call did not end; the last event was transferred at 9700 ms"


def test_call_ended_by_the_wrong_side(scenario):
    failed = only_failure(scenario, changed("call_ended", data={"by": "caller"}))
    assert failed.detail == "the call was ended by the caller at 9800 ms; expected by the agent"


def test_not_transferred(scenario):
    failed = only_failure(scenario, changed("transferred", remove=True))
    assert failed.name == "call_transferred to +15551234567"
    assert failed.detail == "the call was not transferred; the call ended at 9800 ms"
    wrong = only_failure(scenario, changed("transferred", data={"to": "+15550000000"}))
    assert wrong.detail == "transferred to +15550000000; expected +15551234567"


def test_a_transfer_the_line_could_not_make_says_why(scenario):
    refused = {"to": "+15551234567", "reason": "a webrtc call cannot be transferred"}
    failed = only_failure(scenario, changed("transferred", kind="transfer_failed", data=refused))
    assert failed.name == "call_transferred to +15551234567"
    assert failed.detail == "the agent asked for +15551234567 at 9700 ms, but a webrtc call cannot be transferred"


def test_dtmf_not_sent(scenario):
    failed = only_failure(scenario, changed("dtmf_sent", remove=True))
    assert failed.name == "dtmf_sent '1'"
    assert failed.detail == "the agent sent no DTMF in the call; expected '1'"
    wrong = only_failure(scenario, changed("dtmf_sent", data={"digits": "9"}))
    assert wrong.detail == "the agent sent '9' in the call; expected '1'"


def test_an_error_event_fails_the_run(scenario):
    failed = only_failure(scenario, [*conversation(), Event(9000, "error", 3, {"message": "tool crashed"})])
    assert (failed.name, failed.detail) == ("no errors during the call", "9000 ms: tool crashed")


def test_percentiles_are_nearest_rank():
    assert percentile([100, 200, 300, 400], 50) == 200
    assert percentile([100, 200, 300, 400], 95) == 400
    assert percentile(list(range(1, 21)), 95) == 19
    assert percentile([7], 50) == 7


def test_limits_over_all_runs(tmp_path):
    def runs_with(first_audio: list[float], stops: list[float], n: int) -> RunResult:
        events = []
        for i, ms in enumerate(first_audio):
            events += [
                Event(i * 10000, "caller_speech_end", i),
                Event(i * 10000 + ms, "agent_audio_start", i),
            ]
        for i, ms in enumerate(stops):
            events += [
                Event(50000 + i * 1000, "barge_in", 9),
                Event(50000 + i * 1000 + ms, "agent_stopped", 9),
            ]
        return run(events, n=n)

    scenario = Scenario(
        name="order status",
        runs=2,
        turns=[Turn(kind="user", text="hi")],
        limits={"first_audio_ms": {"p50": 450, "p95": 700}, "barge_in_stop_ms": {"p95": 300}},
        limit_lines={"first_audio_ms.p50": 7, "first_audio_ms.p95": 7, "barge_in_stop_ms.p95": 8},
    )
    results = [
        runs_with([300, 400, 500], [100, 250], 1),
        runs_with([600, 800], [], 2),
        dataclasses.replace(
            runs_with([9999], [9999], 1), scenario="another"
        ),  # not this scenario: passed over
    ]
    p50, p95, stop = evaluate_limits(scenario, results)
    assert (p50.name, p50.passed, p50.value_ms, p50.line) == (
        "order status: first_audio_ms p50 <= 450 ms",
        False,
        500,
        7,
    )
    assert p50.detail == "p50 500 ms over 5 measurements in 2 runs; limit 450 ms"
    assert (p95.passed, p95.value_ms) == (False, 800)
    assert (stop.passed, stop.value_ms, stop.line) == (True, 250, 8)

    nothing = evaluate_limits(scenario, [runs_with([300], [], 1)])
    assert not nothing[2].passed
    assert nothing[2].detail == "no measurements: 1 runs had no barge-ins that stopped the agent"
