import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from flows.tools import ToolSpec, run_tool

PARAMS = {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}


def python_tool(**extra):
    return ToolSpec.model_validate(
        {"description": "t", "parameters": PARAMS, "python": "m:f", "fallback": "Sorry, not now.", **extra}
    )


def http_tool(url, **extra):
    http = {"url": url, **extra.pop("http", {})}
    return ToolSpec.model_validate(
        {
            "description": "t",
            "parameters": PARAMS,
            "http": http,
            "fallback": "Sorry, not now.",
            "fields": ["status"],
            **extra,
        }
    )


class Spoken:
    def __init__(self):
        self.texts = []

    async def __call__(self, text):
        self.texts.append(text)


async def test_sync_and_async_python_tools_return_their_result():
    def sync_lookup(order_id):
        return {"status": "shipped", "id": order_id}

    async def async_lookup(order_id):
        await asyncio.sleep(0)
        return {"status": "packed", "id": order_id}

    one = await run_tool("t", python_tool(), {"order_id": "7"}, {}, function=sync_lookup)
    two = await run_tool("t", python_tool(), {"order_id": "8"}, {}, function=async_lookup)
    assert (one.ok, one.result) == (True, {"status": "shipped", "id": "7"})
    assert (two.ok, two.result) == (True, {"status": "packed", "id": "8"})


async def test_python_tool_gets_a_copy_of_state_when_it_asks_and_only_declared_fields_come_back():
    def lookup(order_id, state):
        state["tampered"] = True
        return {"status": "shipped", "caller": state["caller"], "secret": "x"}

    state = {"caller": "+15550001111"}
    outcome = await run_tool(
        "t", python_tool(fields=["status", "caller"]), {"order_id": "7"}, state, function=lookup
    )
    assert outcome.result == {"status": "shipped", "caller": "+15550001111"}
    assert "tampered" not in state


async def test_a_tool_that_raises_gives_the_fallback_instead_of_an_exception():
    def broken(order_id):
        raise ConnectionError("database down")

    outcome = await run_tool("t", python_tool(), {"order_id": "7"}, {}, function=broken)
    assert not outcome.ok
    assert outcome.fallback == "Sorry, not now."
    assert outcome.result["fallback"] == "Sorry, not now."
    assert "database down" in outcome.result["error"]


async def test_a_tool_past_its_timeout_gives_the_fallback():
    async def slow(order_id):
        await asyncio.sleep(5)

    outcome = await run_tool("t", python_tool(timeout_secs=0.05), {"order_id": "7"}, {}, function=slow)
    assert not outcome.ok
    assert "timed out after 0.05 s" in outcome.result["error"]


async def test_arguments_that_break_the_schema_never_reach_the_tool():
    called = []
    outcome = await run_tool(
        "t", python_tool(), {"order_id": 7}, {}, function=lambda order_id: called.append(1)
    )
    missing = await run_tool("t", python_tool(), {}, {}, function=lambda order_id: called.append(1))
    assert not outcome.ok and "order_id is 7; expected string" in outcome.result["error"]
    assert not missing.ok and "order_id is missing" in missing.result["error"]
    assert called == []


async def test_the_filler_is_spoken_only_when_the_tool_runs_past_filler_after_secs():
    async def slow(order_id):
        await asyncio.sleep(0.3)
        return {"status": "ok"}

    async def fast(order_id):
        return {"status": "ok"}

    tool = python_tool(filler="One moment.", filler_after_secs=0.05)
    spoken_slow, spoken_fast = Spoken(), Spoken()
    await run_tool("t", tool, {"order_id": "1"}, {}, function=slow, say=spoken_slow)
    await run_tool("t", tool, {"order_id": "1"}, {}, function=fast, say=spoken_fast)
    await asyncio.sleep(0.1)  # a filler left pending would speak now
    assert spoken_slow.texts == ["One moment."]
    assert spoken_fast.texts == []


# -- HTTP tools, against a server on 127.0.0.1 --------------------------------------------------------


@pytest.fixture
async def shop():
    seen = []

    async def order(request):
        body = await request.json() if request.can_read_body else None
        seen.append(
            {
                "raw_path": request.raw_path,
                "headers": dict(request.headers),
                "query": dict(request.query),
                "method": request.method,
                "body": body,
            }
        )
        if request.match_info["order_id"] == "slow":
            await asyncio.sleep(2)
        if request.match_info["order_id"] == "broken":
            return web.json_response({"message": "boom"}, status=500)
        return web.json_response(
            {
                "status": "shipped",
                "delivery": {"eta": "Tuesday"},
                "internal_cost": 12.5,
            }
        )

    app = web.Application()
    app.router.add_route("*", "/api/{customer}/orders/{order_id}", order)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}", seen
    await server.close()


async def test_http_tool_fills_the_url_from_arguments_and_state_url_encoded(shop):
    base, seen = shop
    tool = http_tool(base + "/api/{{ customer.id }}/orders/{{ order_id }}")
    outcome = await run_tool("t", tool, {"order_id": "A/7 b"}, {"customer": {"id": "c 1"}})
    assert outcome.ok
    assert seen[0]["raw_path"] == "/api/c%201/orders/A%2F7%20b"


async def test_http_tool_returns_only_the_declared_fields_walking_into_the_json(shop):
    base, _ = shop
    tool = http_tool(
        base + "/api/c1/orders/{{ order_id }}",
        fields={"status": "status", "eta": "delivery.eta", "gone": "nope"},
    )
    outcome = await run_tool("t", tool, {"order_id": "7"}, {})
    assert outcome.result == {"status": "shipped", "eta": "Tuesday", "gone": None}


async def test_http_header_values_come_from_the_environment_at_call_time(shop, monkeypatch):
    base, seen = shop
    tool = http_tool(
        base + "/api/c1/orders/{{ order_id }}", http={"headers": {"Authorization": "Bearer ${SHOP_TOKEN}"}}
    )
    monkeypatch.setenv("SHOP_TOKEN", "first")
    await run_tool("t", tool, {"order_id": "7"}, {})
    monkeypatch.setenv("SHOP_TOKEN", "second")
    await run_tool("t", tool, {"order_id": "7"}, {})
    assert [r["headers"]["Authorization"] for r in seen] == ["Bearer first", "Bearer second"]


async def test_a_missing_environment_variable_is_a_clear_failure_not_a_request(shop, monkeypatch):
    base, seen = shop
    monkeypatch.delenv("SHOP_TOKEN", raising=False)
    tool = http_tool(
        base + "/api/c1/orders/{{ order_id }}", http={"headers": {"Authorization": "Bearer ${SHOP_TOKEN}"}}
    )
    outcome = await run_tool("t", tool, {"order_id": "7"}, {})
    assert not outcome.ok
    assert "environment variable SHOP_TOKEN is not set (header Authorization)" in outcome.result["error"]
    assert seen == []


async def test_arguments_not_in_the_url_go_in_the_query_for_get_and_the_json_body_for_post(shop):
    base, seen = shop
    params = {
        "type": "object",
        "properties": {"order_id": {"type": "string"}, "verbose": {"type": "boolean"}},
    }
    get = http_tool(base + "/api/c1/orders/{{ order_id }}", parameters=params)
    post = http_tool(base + "/api/c1/orders/{{ order_id }}", parameters=params, http={"method": "POST"})
    await run_tool("t", get, {"order_id": "7", "verbose": True}, {})
    await run_tool("t", post, {"order_id": "7", "verbose": True}, {})
    assert seen[0]["query"] == {"verbose": "true"}
    assert seen[1]["method"] == "POST" and seen[1]["body"] == {"verbose": True}


async def test_http_error_status_and_timeout_give_the_fallback(shop):
    base, _ = shop
    broken = await run_tool(
        "t", http_tool(base + "/api/c1/orders/{{ order_id }}"), {"order_id": "broken"}, {}
    )
    slow = await run_tool(
        "t", http_tool(base + "/api/c1/orders/{{ order_id }}", timeout_secs=0.2), {"order_id": "slow"}, {}
    )
    assert not broken.ok and "HTTP 500" in broken.result["error"]
    assert not slow.ok and slow.fallback == "Sorry, not now."


async def test_arguments_the_schema_does_not_declare_are_dropped_before_the_call():
    outcome = await run_tool(
        "t",
        python_tool(),
        {"order_id": "7", "invented": 1},
        {},
        function=lambda order_id: {"status": order_id},
    )
    assert outcome.ok and outcome.result == {"status": "7"}
