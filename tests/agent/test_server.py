"""The HTTP side of the server: page, agent info, health, metrics, and how /api/offer treats bad requests."""

import re

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
    assert types == {
        "chroma_agents_calls_active": "gauge",
        "chroma_agents_calls_total": "counter",
        "chroma_agents_turns_total": "counter",
        "chroma_agents_barge_ins_total": "counter",
        "chroma_agents_dropped_input_total": "counter",
        "chroma_agents_time_to_first_audio_seconds": "histogram",
    }
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
