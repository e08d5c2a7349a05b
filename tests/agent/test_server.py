"""The HTTP side of the server: page, agent info, health, metrics, and how /api/offer treats bad requests."""

import re
import time

import pytest
from fastapi.testclient import TestClient

from agent.runtime import STAND_IN_NOTICE, AgentRuntime
from agent.server import create_app
from agent.spec import WebRTCTransportSpec, load_agent

AGENT = "examples/agents/demo/agent.yaml"

# A minimal offer Chromium would send, trimmed to what aiortc needs to answer.
AUDIO_OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "c=IN IP4 0.0.0.0",
        "a=rtcp:9 IN IP4 0.0.0.0",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:abcdefghijklmnopqrstuvwx",
        "a=fingerprint:sha-256 " + ":".join(["AB"] * 32),
        "a=setup:actpass",
        "a=mid:0",
        "a=sendrecv",
        "a=rtcp-mux",
        "a=rtpmap:111 opus/48000/2",
        "",
    ]
)


@pytest.fixture(scope="module")
def runtime():
    return AgentRuntime(load_agent(AGENT, model="tiny"))


@pytest.fixture(scope="module")
def client(runtime):
    with TestClient(create_app(runtime)) as c:
        yield c


def test_healthz_reports_status_calls_and_model(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "calls_active": 0, "model": "tiny"}


def test_metrics_are_prometheus_text_with_every_family(client):
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    types, samples = {}, {}
    for line in r.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line and not line.startswith("#"):
            # name{labels} value: every sample line has a metric name and a number
            m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)", line)
            assert m, f"not a sample line: {line!r}"
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    assert types.items() >= {
        "chroma_agents_calls_active": "gauge",
        "chroma_agents_calls_total": "counter",
        "chroma_agents_turns_total": "counter",
        "chroma_agents_barge_ins_total": "counter",
        "chroma_agents_dropped_input_total": "counter",
        "chroma_agents_time_to_first_audio_seconds": "histogram",
        "chroma_agents_calls_refused_total": "counter",
        "chroma_sip_refusals_total": "counter",
        "chroma_agents_sessions": "gauge",
        "chroma_agents_sessions_reserved": "gauge",
        "chroma_agents_max_sessions": "gauge",
    }.items()
    # the model's own scheduler reports the engine by default
    assert {"chroma_engine_batch_size", "chroma_engine_tick_seconds", "chroma_engine_sessions"} <= set(types)
    assert samples["chroma_agents_max_sessions"] == 32 and samples["chroma_agents_sessions"] == 0
    assert samples["chroma_agents_calls_active"] == 0
    assert "chroma_agents_turns_total" in samples
    assert 'chroma_agents_time_to_first_audio_seconds_bucket{le="+Inf"}' in samples


def test_api_agent_says_the_tiny_model_is_a_stand_in(client):
    r = client.get("/api/agent")
    assert r.status_code == 200
    assert r.json() == {
        "name": "Demo support agent",
        "model": "tiny",
        "stand_in": True,
        "notice": STAND_IN_NOTICE,
    }


def test_api_agent_names_the_stand_in_when_it_replaces_the_agent_files_model(runtime):
    # The demo file names FlashLabs/Chroma-4B; on a machine without it the tiny model speaks instead.
    spec = load_agent(AGENT)
    assert spec.model != "tiny"
    with TestClient(create_app(AgentRuntime(spec, model=runtime.model))) as c:
        info = c.get("/api/agent").json()
        assert (info["model"], info["stand_in"], info["notice"]) == ("tiny", True, STAND_IN_NOTICE)
        assert c.get("/healthz").json()["model"] == "tiny"


def test_page_has_its_hooks_and_loads_nothing_from_elsewhere(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    page = r.text
    for hook in ('id="stand-in-notice"', "/api/agent", "/api/offer", "window.chromaState", 'id="hangup"'):
        assert hook in page, hook
    # The page must work offline: no scripts, styles, fonts or images from another host.
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.IGNORECASE)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", "body"),
        (b"[1, 2]", "body"),
        (b'{"type": "offer"}', "sdp"),
        (b'{"sdp": "", "type": "offer"}', "sdp"),
        (b'{"sdp": 5, "type": "offer"}', "sdp"),
        (b'{"sdp": "v=0", "type": "answer"}', "type"),
        (b'{"sdp": "v=0"}', "type"),
        (b'{"sdp": "v=0\\r\\n", "type": "offer"}', "sdp"),  # no audio section
        (b'{"sdp": "m=audio garbage", "type": "offer"}', "sdp"),  # aiortc cannot parse it
        (b'{"sdp": "m=audio 9", "type": "offer", "pc_id": "x"}', "pc_id"),
    ],
)
def test_bad_offer_bodies_are_400_naming_the_field(client, runtime, body, field):
    dropped = runtime.metrics.dropped_input["bad_offer"]
    r = client.post("/api/offer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith(f"{field}:"), r.json()
    assert client.get("/healthz").json()["calls_active"] == 0
    assert runtime.metrics.dropped_input["bad_offer"] == dropped + 1  # counted for /metrics


def test_a_good_offer_is_answered_and_the_unconnected_call_is_freed_on_shutdown(runtime):
    with TestClient(create_app(runtime)) as c:
        r = c.post("/api/offer", json={"sdp": AUDIO_OFFER, "type": "offer"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["type"] == "answer"
        assert "m=audio" in answer["sdp"] and answer["pc_id"]
        assert len(c.app.state.calls.active) == 1
    # Leaving the TestClient shuts the app down, which must end the call and free its session.
    assert c.app.state.calls.active == {}
    assert runtime.calls == {}


def test_offers_are_refused_with_503_when_webrtc_is_off(runtime):
    spec = runtime.spec
    off = spec.model_copy(
        update={
            "transports": spec.transports.model_copy(update={"webrtc": WebRTCTransportSpec(enabled=False)})
        }
    )
    with TestClient(create_app(AgentRuntime(off, model=runtime.model))) as c:
        r = c.post("/api/offer", json={"sdp": AUDIO_OFFER, "type": "offer"})
        assert r.status_code == 503
        assert "transports.webrtc.enabled" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200


# --- capacity: max_sessions, /readyz, the engine's status ----------------------------------------------


def limited(runtime, max_sessions=1, **kwargs) -> AgentRuntime:
    spec = runtime.spec.model_copy(update={"max_sessions": max_sessions})
    return AgentRuntime(spec, model=runtime.model, **kwargs)


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_readyz_turns_503_at_max_sessions_and_back_to_200_when_the_call_ends(runtime):
    one = limited(runtime, max_sessions=1)
    with TestClient(create_app(one)) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200
        assert ready.json().items() >= {"ready": True, "sessions": 0, "max_sessions": 1}.items()
        assert c.post("/api/offer", json={"sdp": AUDIO_OFFER, "type": "offer"}).status_code == 200
        full = c.get("/readyz")
        assert full.status_code == 503
        assert full.json()["ready"] is False and "at capacity" in full.json()["reason"]
        # the next browser gets a busy answer, not a share of a degraded model
        busy = c.post("/api/offer", json={"sdp": AUDIO_OFFER, "type": "offer"})
        assert busy.status_code == 503 and busy.json()["error"].startswith("busy: at capacity")
        assert len(c.app.state.calls.active) == 1
        (call,) = one.calls.values()
        c.portal.call(call.cancel, "test over")
        wait_until(lambda: c.get("/readyz").status_code == 200)
        assert c.get("/readyz").json()["sessions"] == 0
        metrics = c.get("/metrics").text
    assert 'chroma_agents_calls_refused_total{transport="webrtc",reason="at_capacity"} 1' in metrics


def test_readyz_503_and_calls_refused_while_the_engine_is_behind_real_time(runtime):
    status = {"behind_real_time": False, "batch_size": 3, "tick_seconds": 0.05, "sessions": 3}
    engine = limited(runtime, max_sessions=8, engine_status=lambda: dict(status))
    with TestClient(create_app(engine)) as c:
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["engine"]["batch_size"] == 3
        metrics = c.get("/metrics").text
        for line in (
            "chroma_engine_batch_size 3",
            "chroma_engine_tick_seconds 0.05",
            "chroma_engine_sessions 3",
            "chroma_engine_behind_real_time 0",
        ):
            assert line in metrics.splitlines()
        status["behind_real_time"] = True
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json().items() >= {"ready": False, "reason": "engine behind real time"}.items()
        assert "chroma_engine_behind_real_time 1" in c.get("/metrics").text.splitlines()
        busy = c.post("/api/offer", json={"sdp": AUDIO_OFFER, "type": "offer"})
        assert busy.status_code == 503 and "engine behind real time" in busy.json()["error"]
        assert engine.calls == {}
        status["behind_real_time"] = False
        assert c.get("/readyz").status_code == 200


def test_an_engine_status_that_fails_counts_as_not_ready(runtime):
    def broken():
        raise RuntimeError("engine gone")

    engine = limited(runtime, max_sessions=8)
    engine.engine_status = broken  # the attribute is where the engine's status plugs in
    with TestClient(create_app(engine)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "engine gone" in r.json()["reason"]
        assert c.get("/metrics").status_code == 200


def test_the_server_renders_what_its_agent_says_when_the_model_fails_before_taking_calls(client, runtime):
    # `client` has started the app: the lines are in memory, in the agent's voice, before any call.
    lines = runtime.model_error_audio
    assert lines.apology and lines.goodbye and lines.apology != lines.goodbye
    assert lines.hang_up_after == runtime.spec.response.on_model_error.hang_up_after == 3
    text = client.get("/metrics").text
    assert "# TYPE chroma_agents_turns_failed_total counter" in text
    assert "\nchroma_agents_turns_failed_total 0\n" in text
