"""baresip as the SIP line's phone: what it does when the far end will not take the call."""

import asyncio

import pytest

from agent.lines.sip import sip_server
from agent.runtime import AgentRuntime
from agent.spec import load_agent
from agent.testing.baresip import BARESIP, Baresip

from .test_runner import ROOT

pytestmark = pytest.mark.skipif(BARESIP is None, reason="baresip is not installed (apt-get install baresip)")


def test_a_call_the_agent_refuses_fails_naming_the_uri_and_the_sip_answer(tmp_path):
    runtime = AgentRuntime(load_agent(ROOT / "examples/agents/demo/agent.yaml", model="tiny"))
    settings = runtime.spec.transports.sip.model_copy(
        update={"enabled": True, "host": "127.0.0.1", "port": 0, "allow": ["192.0.2.1"]}  # not this machine
    )
    server = sip_server(runtime, settings)

    async def dial() -> str:
        await server.start()
        try:
            with pytest.raises(RuntimeError) as refused:
                await Baresip.start(tmp_path, f"sip:agent@127.0.0.1:{server.port}")
            return str(refused.value)
        finally:
            await server.stop()

    message = asyncio.run(dial())
    assert "sip:agent@127.0.0.1:" in message
    assert "403" in message or "Forbidden" in message, message
    assert not runtime.calls
