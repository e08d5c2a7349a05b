"""One call's flow: the checked flow file turned into what pipecat's `FlowManager` runs, with the
file's tools and telephony actions bound to this call.

    call_flow = CallFlow(load_flow("flow.yaml"), control)       # control: this call's CallControl
    manager = FlowManager(worker=task, llm=llm, context_aggregator=aggregator,
                          global_functions=call_flow.global_functions)
    await call_flow.start(manager, state={"caller_number": "+15551230000"})
    ...                                                         # keypad: DTMFInput(call_flow.digits)

pipecat's own `Flow` builds the nodes from the file's config and the handlers module (direct
functions, `function` and custom actions, transitions in YAML), and its `FlowManager` fills the
placeholders from `flow_manager.state`; this adds to those same node configs what a phone agent needs: the tools
declared under `tools:`, each node's voice and keypad, and the telephony actions, with pipecat's
`tts_say` and `end_conversation` carried out by the call (spoken through the model, then hang up).
What a tool run adds: its result is saved in state (under `store_as`, default the tool's name) for
`{{ placeholders }}`, and a failed run speaks the tool's fallback and stays on the node without
another model turn.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from loguru import logger
from pipecat.flows import NO_RESPONSE, FlowConfig, FlowManager, FlowsFunctionSchema, NodeConfig
from pipecat.flows.config import case_key

from .actions import CallControl, action_handlers
from .dtmf import DigitCollector
from .file import CALL_STATE, FlowFile
from .tools import run_tool

ENTER_NODE = "enter_node"  # an action of our own that each node starts with: its voice and keypad
TIMEOUT_MARGIN_SECS = 1.0  # pipecat's own function-call timeout must not fire before the tool's
HANDLER_TIMEOUT_SECS = 20.0  # a handler that names no limit of its own must still end (a call never hangs)


class CallFlow:
    """The node configs, function handlers and actions of one call."""

    def __init__(self, flow: FlowFile, control: CallControl):
        self.flow = flow
        self.control = control
        self._actions = action_handlers(control)
        self._manager: FlowManager | None = None
        self._voice: str | None = None
        self.nodes: list[str] = []  # every node entered, in order
        self.on_node = None  # optional callback(name), as each node is entered
        self.digits = DigitCollector(go=self.go_to, state=lambda: self._manager.state)
        # pipecat's Flow resolves the handlers and wires transitions to its own node dicts; our additions
        # go into those same dicts, so a transition made by pipecat's code lands on a node with them.
        pipecat_flow = flow.pipecat_flow()
        self._nodes: dict[str, NodeConfig] = {name: pipecat_flow.node(name) for name in flow.config.nodes}
        for name, node in flow.config.nodes.items():
            self._extend(name, node, self._nodes[name])
        self._global_functions = self._functions(flow.config.global_functions, pipecat_flow.global_functions)

    @property
    def initial_node(self) -> NodeConfig:
        return self._nodes[self.flow.config.initial_node]

    @property
    def global_functions(self) -> list[FlowsFunctionSchema]:
        """For `FlowManager(global_functions=...)`; a fresh list each time."""
        return list(self._global_functions)

    def node(self, name: str) -> NodeConfig:
        return self._nodes[name]

    async def start(self, manager: FlowManager, state: Mapping[str, Any] | None = None) -> None:
        """Seed the flow's state (the file's `state:`, then the call's own values) and enter the
        initial node."""
        self._manager = manager
        for kind, handler in self._actions.items():
            manager.register_action(kind, handler)  # end_conversation: the call hangs up
        if self.flow.handlers is not None:
            self.flow.handlers.register(_GuardedActions(manager))
        manager.state.update({key: "" for key in CALL_STATE})
        manager.state.update(self.flow.state)
        manager.state.update(state or {})
        await manager.initialize(self.initial_node)

    async def go_to(self, name: str) -> None:
        """Move the call to a node, as a transition from a function would."""
        try:
            await self._manager.set_node_from_config(self._nodes[name])
        except Exception:
            logger.exception(f"flow: moving to node {name!r} failed")

    # -- building ----------------------------------------------------------------------------------

    def _extend(self, name: str, node: FlowConfig.Node, config: NodeConfig) -> None:
        config["pre_actions"] = [
            {"type": ENTER_NODE, "node": name, "handler": self._enter},
            *map(_carried_out, config.get("pre_actions", [])),
        ]
        if config.get("post_actions"):
            config["post_actions"] = list(map(_carried_out, config["post_actions"]))
        if node.functions:
            config["functions"] = self._functions(node.functions, config.get("functions", []))

    def _functions(self, refs: list[FlowConfig.Function], built: list) -> list[FlowsFunctionSchema]:
        """The file's functions in its order: pipecat's build of each, or ours for a tool under tools:."""
        by_name = {f.name: f for f in built}
        for function in built:
            if function.timeout_secs is None:  # a handler without @flows_tool_options(timeout_secs=...)
                function.timeout_secs = HANDLER_TIMEOUT_SECS
        return [
            by_name[ref.name] if ref.transition_only or ref.name not in self.flow.tools else self._function(ref)
            for ref in refs
        ]

    def _function(self, ref: FlowConfig.Function) -> FlowsFunctionSchema:
        tool = self.flow.tools[ref.name]

        async def call_tool(args: dict, manager: FlowManager) -> tuple[Any, Any]:
            outcome = await run_tool(
                ref.name,
                tool,
                args,
                manager.state,
                function=self.flow.functions.get(ref.name),
                say=self.control.say,
            )
            if not outcome.ok:
                try:
                    await self.control.say(outcome.fallback)
                except Exception:
                    logger.exception(f"speaking the fallback of tool {ref.name} failed")
                # The caller has heard the fallback; another model turn now would talk over it.
                return outcome.result, NO_RESPONSE
            manager.state[tool.store_as or ref.name] = outcome.result
            return outcome.result, self._destination(ref, outcome.result)

        return FlowsFunctionSchema(
            name=ref.name,
            description=tool.description,
            properties=dict(tool.parameters.get("properties", {})),
            required=list(tool.parameters.get("required", [])),
            handler=call_tool,
            timeout_secs=tool.timeout_secs + TIMEOUT_MARGIN_SECS,
        )

    def _destination(self, ref: FlowConfig.Function, result: dict[str, Any]) -> NodeConfig | None:
        """The node a result leads to, read as pipecat's own configured flows read `transition_to`."""
        target = ref.transition_to
        if target is None:
            return None
        if isinstance(target, str):
            return self._nodes[target]
        if target.field not in result:
            logger.warning(f"tool {ref.name}: result has no field {target.field!r} to branch on; staying")
            return None
        name = target.cases.get(case_key(result[target.field]), target.default)
        return self._nodes[name] if name is not None else None

    async def _enter(self, action: dict, manager: FlowManager) -> None:
        name = action["node"]
        self.nodes.append(name)
        if self.on_node is not None:
            self.on_node(name)
        voice = self.flow.voices.get(name)
        # A voice stays until a node names another, as pipecat's role_message does.
        if voice is not None and voice != self._voice:
            try:
                await self.control.set_voice(voice)
                self._voice = voice
            except Exception:
                logger.exception(f"flow: switching to voice {voice!r} failed")
        self.digits.listen(self.flow.dtmf.get(name))


def _carried_out(action: dict[str, Any]) -> dict[str, Any]:
    """An action as the call runs it. pipecat's `tts_say` becomes our `say` (spoken through the model,
    its placeholders filled from state): a new type rather than a new handler for `tts_say`, because
    pipecat's action runner waits after a `tts_say` for the frame its own handler queues, which the
    model's speech path never sends. A handler from the handlers module gets a time limit."""
    if action.get("type") == "tts_say":
        return {"type": "say", "text": action["text"]}
    if callable(action.get("handler")):
        return {**action, "handler": guarded(action["type"], action["handler"])}
    return action


def guarded(kind: str, handler: Callable) -> Callable[[dict, Any], Awaitable[None]]:
    """An action handler from the handlers module, limited in time and kept from raising into the
    node's transition (pipecat would abandon the node); taking `(action)` or `(action, flow_manager)`
    as pipecat's runner allows."""
    try:
        takes_manager = len(inspect.signature(handler).parameters) > 1
    except (TypeError, ValueError):
        takes_manager = True

    async def run(action: dict, flow_manager: Any) -> None:
        try:
            result = handler(action, flow_manager) if takes_manager else handler(action)
            if inspect.isawaitable(result):
                await asyncio.wait_for(result, HANDLER_TIMEOUT_SECS)
        except TimeoutError:
            logger.error(f"flow action {kind}: its handler took over {HANDLER_TIMEOUT_SECS:g} s; stopped")
        except Exception:
            logger.exception(f"flow action {kind}: its handler failed")

    return run


class _GuardedActions:
    """The flow manager as the handlers module's `register_actions` sees it: what it registers is
    guarded like any other handler; everything else is the manager's own."""

    def __init__(self, manager: FlowManager):
        self._manager = manager

    def register_action(self, action_type: str, handler: Callable) -> None:
        self._manager.register_action(action_type, guarded(action_type, handler))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)
