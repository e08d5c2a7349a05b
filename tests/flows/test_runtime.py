"""Flows driven through pipecat's real FlowManager. The model is not here: a test plays its part by
calling the functions FlowManager hands it, as the model's function calls would."""

import asyncio
import textwrap
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.flows import FlowManager
from pipecat.frames.frames import (
    FunctionCallResultProperties,
    InputDTMFFrame,
    LLMMessagesAppendFrame,
    LLMRunFrame,
    LLMSetToolsFrame,
    LLMUpdateSettingsFrame,
)
from pipecat.services.llm_service import FunctionCallParams
from pipecat.tests.utils import run_test

from flows.actions import CallControl
from flows.dtmf import DigitCollector, DTMFInput, DtmfSpec
from flows.file import load_flow
from flows.runtime import CallFlow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "flows"


class RecordingWorker:
    """Stands in for the pipeline worker: keeps the frames FlowManager queues for the model."""

    def __init__(self):
        self.frames = []

    async def queue_frame(self, frame):
        self.frames.append(frame)

    async def queue_frames(self, frames):
        self.frames.extend(frames)

    def set_reached_downstream_filter(self, types):
        pass

    def event_handler(self, name):
        return lambda handler: handler


class NoCallsInProgress:
    """Stands in for the context aggregator once a function's result is in the context."""

    has_function_calls_in_progress = False

    def assistant(self):
        return self


class RecordingCall:
    """A CallControl that keeps what the flow asked of the call, in order."""

    def __init__(self):
        self.requests = []

    async def hang_up(self, after_current_sentence=True):
        self.requests.append(("hang_up", after_current_sentence))

    async def transfer(self, target):
        self.requests.append(("transfer", target))

    async def send_dtmf(self, digits):
        self.requests.append(("send_dtmf", digits))

    async def play(self, wav_path):
        self.requests.append(("play", wav_path))

    async def say(self, text):
        self.requests.append(("say", text))

    async def set_voice(self, name):
        self.requests.append(("set_voice", name))


class Call:
    def __init__(self, flow_path):
        self.worker, self.control = RecordingWorker(), RecordingCall()
        self.flow = CallFlow(load_flow(flow_path), self.control)
        self.manager = FlowManager(
            llm=None,
            context_aggregator=NoCallsInProgress(),
            worker=self.worker,
            global_functions=self.flow.global_functions,
        )
        self.results = []

    async def start(self, **state):
        await self.flow.start(self.manager, state=state)

    def tools(self):
        """The functions the model is offered now, by name."""
        frame = [f for f in self.worker.frames if isinstance(f, LLMSetToolsFrame)][-1]
        return {t.name: t for t in frame.tools.standard_tools}

    def last_prompt(self):
        frame = [f for f in self.worker.frames if isinstance(f, LLMMessagesAppendFrame)][-1]
        return " ".join(m["content"] for m in frame.messages)

    async def model_calls(self, function, /, **arguments):
        """Call a function as the model would, and let FlowManager finish it as the pipeline does."""

        async def result_callback(result, *, properties: FunctionCallResultProperties | None = None):
            self.results.append((result, properties))
            if properties and properties.on_context_updated:
                await properties.on_context_updated()

        params = FunctionCallParams(
            function_name=function,
            tool_call_id="call-1",
            arguments=arguments,
            llm=None,
            pipeline_worker=self.worker,
            context=None,
            result_callback=result_callback,
        )
        await self.tools()[function].handler(params)
        return self.results[-1]


def write(tmp_path, text, name="flow.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


async def test_the_first_node_gives_the_model_its_role_task_and_tools():
    call = Call(EXAMPLES / "customer_service" / "flow.yaml")
    await call.start()
    settings = [f for f in call.worker.frames if isinstance(f, LLMUpdateSettingsFrame)]
    assert "You are Ava" in settings[0].delta.system_instruction
    assert "ask for their account number" in call.last_prompt()
    tools = call.tools()
    assert set(tools) == {"find_customer", "transfer_to_human"}
    assert tools["find_customer"].properties == {
        "account_number": {
            "type": "string",
            "description": "The account number the caller gave, digits only.",
        }
    }
    assert tools["find_customer"].description.startswith("Find the caller's customer account")
    assert isinstance(call.worker.frames[-1], LLMRunFrame)
    assert call.control.requests == []  # the node names no voice: the agent's own stays
    assert call.manager.current_node == "greet"


async def test_a_tool_result_is_kept_in_state_and_its_field_picks_the_next_node():
    call = Call(EXAMPLES / "customer_service" / "flow.yaml")
    await call.start()
    result, properties = await call.model_calls("find_customer", account_number="10042")
    assert result == {"found": True, "first_name": "Maria", "customer_id": "c-10042"}
    assert properties.run_llm is False  # the next node's own turn follows instead
    assert call.manager.current_node == "order_help"
    assert call.manager.state["customer"]["first_name"] == "Maria"
    assert "Greet Maria by name" in call.last_prompt()
    assert set(call.tools()) == {"lookup_order", "transfer_to_human"}

    other = Call(EXAMPLES / "customer_service" / "flow.yaml")
    await other.start()
    await other.model_calls("find_customer", account_number="99999")
    assert other.manager.current_node == "not_found"


async def test_a_python_tool_sees_the_state_the_call_started_with():
    call = Call(EXAMPLES / "customer_service" / "flow.yaml")
    await call.start(caller_number="+15551230817")
    result, _ = await call.model_calls("find_customer")
    assert result["first_name"] == "James"


async def test_a_failing_tool_speaks_its_fallback_and_stays_without_another_model_turn(tmp_path):
    (tmp_path / "t.py").write_text("def lookup(order_id):\n    raise ConnectionError('down')\n")
    path = write(
        tmp_path,
        """
        initial_node: ask
        tools:
          lookup:
            description: Look up an order.
            parameters: {type: object, properties: {order_id: {type: string}}, required: [order_id]}
            python: t:lookup
            fallback: Our order system is down, sorry.
        nodes:
          ask:
            task_messages: [{role: developer, content: Ask for the order number.}]
            functions: [{name: lookup, transition_to: answer}]
          answer:
            task_messages: [{role: developer, content: Answer.}]
    """,
    )
    call = Call(path)
    await call.start()
    result, properties = await call.model_calls("lookup", order_id="7")
    assert result["fallback"] == "Our order system is down, sorry."
    assert properties.run_llm is False
    assert call.control.requests == [("say", "Our order system is down, sorry.")]
    assert call.manager.current_node == "ask"
    assert "lookup" not in call.manager.state


async def test_transfer_node_runs_its_actions_in_order_through_the_call():
    call = Call(EXAMPLES / "customer_service" / "flow.yaml")
    await call.start()
    frames_before = len(call.worker.frames)
    await call.model_calls("transfer_to_human")
    assert call.manager.current_node == "transfer"
    chime = EXAMPLES / "customer_service" / "audio" / "transfer_chime.wav"
    assert call.control.requests == [
        ("say", "I'll pass you to a colleague now. Please hold."),
        ("play", chime.resolve()),
        ("transfer", "+15550100200"),
    ]
    assert not any(
        isinstance(f, LLMRunFrame) for f in call.worker.frames[frames_before:]
    )  # respond_immediately: false


async def test_end_call_hangs_up_after_the_current_sentence():
    call = Call(EXAMPLES / "customer_service" / "flow.yaml")
    await call.start()
    await call.model_calls("find_customer", account_number="20817")
    call.manager.state["order"] = {"status": "shipped", "eta": "Monday", "carrier": "UPS"}
    await call.flow.go_to("answer_order")
    assert "Tell the caller their order is shipped, arriving Monday" in call.last_prompt()
    await call.model_calls("finished")
    assert call.manager.current_node == "goodbye"
    assert "Thank James for calling" in call.last_prompt()
    assert call.control.requests[-1] == ("hang_up", True)


async def test_say_fills_placeholders_from_state_when_it_runs():
    call = Call(EXAMPLES / "appointments" / "flow.yaml")
    await call.start()
    await call.model_calls("book")
    await call.model_calls("check_availability", date="2026-11-23", time_of_day="morning")
    assert call.manager.current_node == "choose_slot"
    assert "2026-11-23 09:00" in call.last_prompt()
    result, _ = await call.model_calls("book_appointment", slot="2026-11-23 09:00", name="Ann Lee")
    assert call.manager.current_node == "confirmed"
    assert call.control.requests[-1] == ("say", f"You're booked. Your reference is {result['reference']}.")


async def test_keyed_digits_are_stored_and_route_to_the_next_node():
    call = Call(EXAMPLES / "customer_service" / "flow.yaml")
    await call.start()
    for key in "10042#":
        await call.flow.digits.press(key)
    assert call.manager.current_node == "keyed_account"
    assert call.manager.state["account_number"] == "10042"
    assert "typed account number 10042" in call.last_prompt()
    assert not call.flow.digits.listening  # keyed_account collects nothing


async def test_a_single_key_menu_routes_without_a_terminator():
    call = Call(EXAMPLES / "appointments" / "flow.yaml")
    await call.start()
    await call.flow.digits.press("2")
    assert call.manager.current_node == "front_desk"
    assert call.control.requests[-1] == ("transfer", "sip:frontdesk@pbx.riverside-dental.example")


class Routes:
    def __init__(self):
        self.to = []

    async def __call__(self, node):
        self.to.append(node)


async def test_the_keypad_timeout_ends_the_entry_or_routes_to_on_timeout():
    routes, state = Routes(), {}
    collector = DigitCollector(routes, lambda: state)
    collector.listen(
        DtmfSpec(max_digits=4, timeout_secs=0.5, store_as="pin", default="check", on_timeout="menu")
    )
    await asyncio.sleep(0.6)
    assert routes.to == ["menu"]
    collector.listen(DtmfSpec(max_digits=4, timeout_secs=0.5, store_as="pin", default="check"))
    await collector.press("4")
    await collector.press("2")
    assert routes.to == ["menu"]
    await asyncio.sleep(0.6)
    assert routes.to == ["menu", "check"] and state == {"pin": "42"}


async def test_digits_matching_no_route_keep_the_node_listening():
    routes = Routes()
    collector = DigitCollector(routes, dict)
    collector.listen(DtmfSpec(max_digits=1, routes={"1": "orders"}))
    await collector.press("9")
    assert routes.to == [] and collector.listening
    await collector.press("1")
    assert routes.to == ["orders"] and not collector.listening


async def test_a_voice_stays_until_a_node_names_another(tmp_path):
    path = write(
        tmp_path,
        """
        initial_node: a
        nodes:
          a:
            voice: ava
            task_messages: [{role: developer, content: a}]
            functions: [{name: next, transition_only: true, description: go, transition_to: b}]
          b:
            task_messages: [{role: developer, content: b}]
            functions: [{name: next, transition_only: true, description: go, transition_to: c}]
          c:
            voice: leo
            task_messages: [{role: developer, content: c}]
    """,
    )
    call = Call(path)
    await call.start()
    await call.model_calls("next")
    await call.model_calls("next")
    assert call.manager.current_node == "c"
    assert call.control.requests == [("set_voice", "ava"), ("set_voice", "leo")]


def test_the_recording_call_is_a_call_control():
    assert isinstance(RecordingCall(), CallControl)


async def test_keypad_presses_reaching_the_pipeline_feed_the_collector_and_pass_on():
    routes = Routes()
    collector = DigitCollector(routes, dict)
    collector.listen(DtmfSpec(max_digits=3, routes={"12": "billing"}))
    presses = [InputDTMFFrame(button=KeypadEntry(k)) for k in "12#"]
    down, _ = await run_test(DTMFInput(collector), frames_to_send=presses)
    assert routes.to == ["billing"]
    assert [f.button.value for f in down] == ["1", "2", "#"]


async def test_an_http_tool_in_a_call_reads_state_from_an_earlier_tool_and_moves_on(tmp_path, monkeypatch):
    requests = []

    async def order(request):
        requests.append((request.raw_path, request.headers.get("Authorization")))
        return web.json_response({"status": "shipped", "delivery": {"eta": "Friday", "carrier": "DHL"}})

    app = web.Application()
    app.router.add_get("/api/customers/{customer}/orders/{order}", order)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        # The example flow itself, pointed at the local server.
        text = (EXAMPLES / "customer_service" / "flow.yaml").read_text()
        text = text.replace("https://shop.example.com", f"http://127.0.0.1:{server.port}")
        (tmp_path / "audio").mkdir()
        (tmp_path / "audio" / "transfer_chime.wav").write_bytes(
            (EXAMPLES / "customer_service" / "audio" / "transfer_chime.wav").read_bytes()
        )
        (tmp_path / "shop_tools.py").write_text((EXAMPLES / "customer_service" / "shop_tools.py").read_text())
        path = write(tmp_path, text)
        monkeypatch.setenv("SHOP_API_TOKEN", "secret-1")
        call = Call(path)
        await call.start()
        await call.model_calls("find_customer", account_number="10042")
        result, _ = await call.model_calls("lookup_order", order_id="NW 881")
    finally:
        await server.close()
    assert requests == [("/api/customers/c-10042/orders/NW%20881", "Bearer secret-1")]
    assert result == {"status": "shipped", "eta": "Friday", "carrier": "DHL"}
    assert call.manager.current_node == "answer_order"
    assert "order is shipped, arriving Friday with" in call.last_prompt()
