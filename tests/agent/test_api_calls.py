"""POST /api/calls: the admin token, the body's checks, the limits, and a call placed over Twilio's
stand-in (agent/testing/twilio_rest.py; Twilio's cloud cannot be reached from tests)."""

import httpx
import pytest

from agent.access import ADMIN_TOKEN_ENV
from agent.outbound import placed_call
from agent.runtime import AgentRuntime
from agent.server import create_app
from agent.spec import load_agent
from agent.testing.twilio_rest import Callee
from tests.agent.test_twilio_outbound import CALLEE, PUBLIC, TOKEN, agent_file, runtime_for, twilio_line

ADMIN = "admin-secret-token"


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, ADMIN)


def api(runtime, **kw) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(runtime, public_url=PUBLIC))
    return httpx.AsyncClient(transport=transport, base_url="http://agent", **kw)


def bearer(token: str = ADMIN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def offline_runtime(tmp_path, tiny_model, **kw) -> AgentRuntime:
    """Twilio set up against an API nobody listens on: for requests refused before any dialling."""
    return runtime_for(tmp_path, tiny_model, "http://127.0.0.1:9", **kw)


async def test_placing_a_call_needs_the_admin_token(tmp_path, tiny_model, monkeypatch):
    runtime = offline_runtime(tmp_path, tiny_model)
    body = {"to": CALLEE}
    async with api(runtime) as client:
        missing = await client.post("/api/calls", json=body)
        wrong = await client.post("/api/calls", json=body, headers=bearer("not-it"))
        monkeypatch.delenv(ADMIN_TOKEN_ENV)
        unset = await client.post("/api/calls", json=body, headers=bearer())
    assert [missing.status_code, wrong.status_code, unset.status_code] == [401, 401, 403]
    assert ADMIN_TOKEN_ENV in unset.json()["detail"]
    assert runtime.outbound is None or not runtime.outbound.running  # nothing was dialled


async def test_a_call_placed_over_the_api_goes_out_over_twilio_with_its_state(tmp_path, tiny_model):
    async with twilio_line(tmp_path, tiny_model) as (runtime, cloud, host):
        cloud.callee(CALLEE, Callee(pickup="busy"))
        async with httpx.AsyncClient(base_url=f"http://{host}", headers=bearer()) as client:
            r = await client.post(
                "/api/calls", json={"to": CALLEE, "from": "+15550009999", "state": {"appointment": "Tue 10:00"}}
            )
        assert r.status_code == 201, r.text
        placed = placed_call(runtime, r.json()["id"])
        assert placed.to == CALLEE and placed.state == {"appointment": "Tue 10:00"}
        assert await placed.wait(timeout=10) == "busy"
    [create] = [c.form for c in cloud.calls]
    assert create["To"] == [CALLEE] and create["From"] == ["+15550009999"]  # the body's from wins


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "body: expected a JSON object"),
        (b"[1, 2]", "body: expected a JSON object"),
        (b"{}", "to: Field required"),
        (b'{"to": "5551234"}', "to: Value error, expected an E.164 number"),
        (b'{"to": 15551234567}', "to: Input should be a valid string"),
        (b'{"to": "+15551234567", "from": "me"}', "from: Value error, expected an E.164 number"),
        (b'{"to": "+15551234567", "state": "Tue"}', "state: Input should be a valid dictionary"),
        (b'{"to": "+15551234567", "state": {"when": {"day": "Tue"}}}', "state.when"),
        (b'{"to": "+15551234567", "callback": "x"}', "callback: Extra inputs are not permitted"),
    ],
)
async def test_a_bad_body_is_400_naming_the_field(tmp_path, tiny_model, body, field):
    runtime = offline_runtime(tmp_path, tiny_model)
    async with api(runtime, headers=bearer()) as client:
        r = await client.post("/api/calls", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"].startswith(field), r.text
    assert runtime.outbound is None or not runtime.outbound.running


async def test_outbound_limit_is_429_and_a_full_agent_is_503_with_the_reason(tmp_path, tiny_model):
    async with twilio_line(tmp_path, tiny_model, outbound="{max_calls: 1}") as (runtime, cloud, host):
        cloud.callee(CALLEE, Callee(pickup="no-answer", ring_secs=2.0))
        async with httpx.AsyncClient(base_url=f"http://{host}", headers=bearer()) as client:
            first = await client.post("/api/calls", json={"to": CALLEE})
            second = await client.post("/api/calls", json={"to": "+15551230001"})
            assert first.status_code == 201 and second.status_code == 429
            assert "outbound.max_calls 1" in second.json()["reason"]
            await placed_call(runtime, first.json()["id"]).wait(timeout=10)
            runtime.max_sessions = 1
            runtime.reserve("a-sip-call-being-answered")  # the agent's only session, taken
            full = await client.post("/api/calls", json={"to": CALLEE})
    assert full.status_code == 503 and full.json()["reason"].startswith("at capacity")
    assert runtime.metrics.calls_refused[("outbound", "at_capacity")] == 1


async def test_calls_to_numbers_need_twilio_set_up_and_say_how(tmp_path, tiny_model, monkeypatch):
    monkeypatch.delenv("TWILIO_ACCOUNT_SID", raising=False)
    twilio = f"{{enabled: true, auth_token: {TOKEN}}}"  # no account SID: Twilio cannot be asked to call
    runtime = AgentRuntime(load_agent(agent_file(tmp_path, "", twilio=twilio)), model=tiny_model)
    async with api(runtime, headers=bearer()) as client:
        r = await client.post("/api/calls", json={"to": CALLEE})
    assert r.status_code == 503 and "TWILIO_ACCOUNT_SID" in r.json()["detail"]
    assert runtime.outbound is None or not runtime.outbound.running

