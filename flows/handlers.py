"""The handlers module: the Python behind a flow file written in pipecat's format.

A function entry that is not `transition_only` and not one of the file's `tools:` names a pipecat
direct function in this module, and a `function` action (or a custom action with `handler:`) names
a callable in it, exactly as pipecat's `Flow(config, handlers=module)` resolves them:

    async def collect_party_size(flow_manager, size: int, notes: str | None = None):
        \"\"\"Record how many people are coming.

        Args:
            size: Number of guests.
            notes: Anything the caller asked for.
        \"\"\"
        flow_manager.state["party_size"] = size
        return {"size": size}, TRANSITION_IN_YAML

Custom action types without `handler:` are registered in code, as a pipecat bot does on its own
`FlowManager`: the module may define `register_actions(flow_manager)`, which the call runs before
the first node and `flow check` runs against a recorder to learn the types.

Where the module comes from, first found: `handlers:` in the agent file (a Python file relative to
it, or an importable module name), `chroma-agent flow check FLOW --handlers FILE_OR_MODULE`, and
`handlers.py` beside the flow file.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from .tools import load_module_file

HANDLERS_FILE = "handlers.py"
REGISTER_ACTIONS = "register_actions"


@dataclass
class Handlers:
    """A loaded handlers module and the custom action types it registers."""

    module: ModuleType
    where: str  # the file or module name, for messages
    actions: dict[str, Callable] = field(default_factory=dict)

    def lookup(self, name: str) -> Callable | None:
        target = getattr(self.module, name, None)
        return target if callable(target) else None

    def register(self, flow_manager: Any) -> None:
        """Run the module's `register_actions(flow_manager)`, if it has one."""
        hook = getattr(self.module, REGISTER_ACTIONS, None)
        if callable(hook):
            hook(flow_manager)


class HandlersError(ValueError):
    """The handlers module cannot be found, imported, or its `register_actions` fails."""


def is_file_ref(ref: str) -> bool:
    """`handlers.py`, `./flows/h.py` and `/abs/h.py` are files; `shop.handlers` is a module name."""
    return ref.endswith(".py") or "/" in ref or "\\" in ref


def resolve_ref(ref: str | Path | None, base: Path) -> str | Path | None:
    """A handlers reference made absolute: a file relative to `base`, a module name as it is."""
    if ref is None:
        return None
    text = str(ref)
    if is_file_ref(text):
        return (base / Path(text).expanduser()).resolve()
    return text


def default_ref(flow_path: Path) -> Path | None:
    """`handlers.py` beside the flow file, when there is one."""
    beside = flow_path.resolve().parent / HANDLERS_FILE
    return beside if beside.is_file() else None


def load_handlers(ref: str | Path | ModuleType) -> Handlers:
    """Import the handlers module (a file path or module name, or a module already imported) and learn
    the action types it registers. Raises HandlersError with the reason."""
    if isinstance(ref, ModuleType):
        module, where = ref, ref.__name__
    elif isinstance(ref, Path) or is_file_ref(str(ref)):
        path = Path(ref)
        if not path.is_file():
            raise HandlersError(f"{path} is not a file; expected a Python file of flow handlers")
        try:
            module = load_module_file(path)
        except ImportError as exc:
            raise HandlersError(str(exc)) from None
        where = str(path)
    else:
        try:
            module = importlib.import_module(str(ref))
        except Exception as exc:
            raise HandlersError(f"module {str(ref)!r} cannot be imported: {type(exc).__name__}: {exc}") from None
        where = str(ref)
    handlers = Handlers(module, where)
    hook = getattr(module, REGISTER_ACTIONS, None)
    if hook is not None:
        if not callable(hook) or inspect.iscoroutinefunction(hook):
            raise HandlersError(
                f"{where}: {REGISTER_ACTIONS} must be a plain function taking the flow manager "
                "(def register_actions(flow_manager): flow_manager.register_action(...))"
            )
        recorder = _ActionRecorder()
        try:
            hook(recorder)
        except Exception as exc:
            raise HandlersError(
                f"{where}: {REGISTER_ACTIONS}(flow_manager) raised {type(exc).__name__}: {exc}; at load time "
                "it may only call flow_manager.register_action(type, handler)"
            ) from None
        handlers.actions = recorder.actions
    return handlers


class _ActionRecorder:
    """Stands in for `FlowManager` while `register_actions` runs at load time."""

    def __init__(self):
        self.actions: dict[str, Callable] = {}
        self.state: dict[str, Any] = {}

    def register_action(self, action_type: str, handler: Callable) -> None:
        if not callable(handler):
            raise ValueError(f"the handler for action {action_type!r} is not callable")
        self.actions[action_type] = handler


class UnreadHandlers(Handlers):
    """Stands in for a handlers module that failed to load, so that its failure is the one problem
    reported about it rather than one per name the flow takes from it."""

    class _Everything(dict):
        def __contains__(self, key: object) -> bool:
            return True

    def __init__(self, where: str):
        super().__init__(ModuleType("unread_handlers"), where, UnreadHandlers._Everything())

    def lookup(self, name: str) -> Callable | None:
        return _any_handler


async def _any_handler(flow_manager: Any) -> None:
    """Whatever the unread module would have held."""
