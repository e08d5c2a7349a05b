"""The conversation-test line for outbound calls ("sip-outbound"): the agent places the call over SIP to
baresip, which answers; the scenario's turns are the callee's, played as on an inbound line."""

import asyncio
import random
import textwrap
from pathlib import Path

import pytest

from agent.runtime import AgentRuntime
from agent.testing.baresip import BARESIP
from agent.testing.pipecat_evals import load_scenarios
from agent.testing.runner import ScenarioRunner
from tests.speech import requires_espeak

ROOT = Path(__file__).resolve().parents[2]
requires_baresip = pytest.mark.skipif(
    BARESIP is None, reason="baresip is not installed (apt-get install baresip)"
)

@pytest.fixture(autouse=True)
def engine_keeps_up(monkeypatch):
    """The engine's real-time verdict (measured on this shared, loaded CPU) would refuse the call as busy;
    this test is about the line, and the capacity rules have their own tests (tests/agent/test_dial.py)."""
    monkeypatch.setattr(AgentRuntime, "engine_state", lambda self: None)


SCRIPT = """
turns = [["Hello, this is the clinic calling about your appointment."], ["Great, see you on Tuesday."]]
"""

# Time to first audio counts from the end of the callee's words, so here it includes the answering-machine
# detector's pause (0.8 s) and the end of turn (0.4 s) besides the reply; room for a shared 2-core machine.
SCENARIO = """
agent: agent.yaml
scenarios:
  - name: appointment reminder
    script: script.py:turns
    turns:
      - user: "Hello?"
        expect:
          - {event: bot_started_speaking, within_ms: 4000}
      - user: "Yes, Tuesday works for me."
        pause_ms: 500
        expect:
          - {event: bot_started_speaking, within_ms: 3000}
"""


@requires_espeak
@requires_baresip
def test_an_outbound_scenario_runs_like_an_inbound_one(tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    rtp_first = random.randrange(30000, 59000, 2)
    (tmp_path / "agent.yaml").write_text(
        textwrap.dedent(
            f"""
            name: reminder agent
            model: tiny
            voice: {ROOT / "examples/voices/demo"}
            turn: {{detector: silence, silence_secs: 0.4}}
            response: {{max_seconds: 2}}
            transports: {{sip: {{host: 127.0.0.1, rtp_ports: [{rtp_first}, {rtp_first + 99}]}}}}
            """
        )
    )
    (tmp_path / "reminder.yaml").write_text(SCENARIO)
    file = load_scenarios(tmp_path / "reminder.yaml")
    result = asyncio.run(ScenarioRunner().run(file, file.scenarios[0], "sip-outbound", 1))
    assert result.error is None, result.error
    assert len(result.checks) >= 2 and [c.name for c in result.checks if not c.passed] == []
    kinds = [e.kind for e in result.events]
    assert kinds.count("caller_speech_start") == 2 and "agent_audio_start" in kinds
