"""The admin token: admin endpoints always need it, record views only off loopback."""

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from agent.access import ADMIN_TOKEN_ENV, is_loopback, require_admin, require_viewer


def _app(listen_host: str | None = None) -> FastAPI:
    app = FastAPI()
    if listen_host is not None:
        app.state.listen_host = listen_host

    @app.post("/admin/thing", dependencies=[Depends(require_admin)])
    async def thing() -> dict:
        return {"ok": True}

    @app.get("/view", dependencies=[Depends(require_viewer)])
    async def view() -> dict:
        return {"ok": True}

    return app


def test_admin_endpoint_refused_when_no_token_is_configured(monkeypatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    r = TestClient(_app()).post("/admin/thing", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403
    assert ADMIN_TOKEN_ENV in r.json()["detail"]


@pytest.mark.parametrize(
    ("headers", "params", "status"),
    [
        ({}, {}, 401),
        ({"Authorization": "Bearer wrong"}, {}, 401),
        ({"Authorization": "Basic s3cret"}, {}, 401),
        ({"Authorization": "Bearer s3cret"}, {}, 200),
        ({"Authorization": "bearer s3cret"}, {}, 200),
        ({}, {"token": "s3cret"}, 200),
        ({}, {"token": "s3cre"}, 401),
    ],
)
def test_admin_endpoint_needs_the_token(monkeypatch, headers, params, status):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "s3cret")
    r = TestClient(_app()).post("/admin/thing", headers=headers, params=params)
    assert r.status_code == status


def test_views_are_open_on_loopback_and_need_the_token_beyond(monkeypatch):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "s3cret")
    assert TestClient(_app("127.0.0.1")).get("/view").status_code == 200
    assert TestClient(_app()).get("/view").status_code == 200  # an app that listens nowhere
    outside = TestClient(_app("0.0.0.0"))
    assert outside.get("/view").status_code == 401
    assert outside.get("/view", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "example.com"]))
