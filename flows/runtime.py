"""One call's flow: the checked flow file turned into what pipecat's `FlowManager` runs, with the
file's tools and telephony actions bound to this call.

    call_flow = CallFlow(load_flow("flow.yaml"), control)       # control: this call's CallControl
    manager = FlowManager(worker=task, llm=llm, context_aggregator=aggregator,
                          global_functions=call_flow.global_functions)
    await call_flow.start(manager, state={"caller_number": "+15551230000"})
    ...                                                         # keypad: DTMFInput(call_flow.digits)

Transitions are pipecat's own: a function's handler returns `(result, next node)` and `FlowManager`
moves there. What a tool run adds: its result is saved in state (under `store_as`, default the
tool's name) for `{{ placeholders }}`, and a failed run speaks the tool's fallback and stays on the
node without another model turn.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loguru import logger
from pipecat.flows import NO_RESPONSE, FlowConfig, FlowManager, FlowsFunctionSchema, NodeConfig
from pipecat.flows.config import case_key
from pipecat.flows.types import ContextStrategyConfig

from .actions import CallControl, action_handlers
from .dtmf import DigitCollector
from .file import FlowFile
from .tools import run_tool

ENTER_NODE = "enter_node"  # an action of our own that each node starts with: its voice and keypad
TIMEOUT_MARGIN_SECS = 1.0  # pipecat's own function-call timeout must not fire before the tool's


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
        self._nodes: dict[str, NodeConfig] = {
            name: self._node(name, node) for name, node in flow.config.nodes.items()
        }
        self._global_functions = [self._function(f) for f in flow.config.global_functions]

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

    def _node(self, name: str, node: FlowConfig.Node) -> NodeConfig:
        config: NodeConfig = {
            "name": name,
            "task_messages": [{"role": m.role, "content": m.content} for m in node.task_messages],
            "respond_immediately": node.respond_immediately,
            "pre_actions": [
                {"type": ENTER_NODE, "node": name, "handler": self._enter},
                *(self._action(a) for a in node.pre_actions),
            ],
        }
        if node.role_message is not None:
            config["role_message"] = node.role_message
        if node.functions:
            config["functions"] = [self._function(f) for f in node.functions]
        if node.post_actions:
            config["post_actions"] = [self._action(a) for a in node.post_actions]
        if node.context_strategy is not None:
            config["context_strategy"] = ContextStrategyConfig(strategy=node.context_strategy_enum())
        return config

    def _action(self, action: FlowConfig.Action) -> dict[str, Any]:
        return {"type": action.type, **action.extras(), "handler": self._actions[action.type]}

    def _function(self, ref: FlowConfig.Function) -> FlowsFunctionSchema:
        if ref.transition_only:

            async def transition(args: dict, manager: FlowManager) -> tuple[Any, NodeConfig]:
                return None, self._nodes[ref.transition_to]

            return FlowsFunctionSchema(
                name=ref.name, description=ref.description, properties={}, required=[], handler=transition
            )
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
