"""Tools a flow's model can call: a Python function or an HTTP request, declared in the flow file.

    tools:
      lookup_order:
        description: Look up an order by its number.
        parameters:                      # JSON Schema for the arguments
          type: object
          properties: {order_id: {type: string}}
          required: [order_id]
        http:
          method: GET
          url: https://shop.example.com/api/orders/{{ order_id }}    # from arguments, then state
          headers: {Authorization: "Bearer ${SHOP_API_TOKEN}"}      # from the environment, per call
        fields: [status, eta]            # what comes back (dotted paths walk into the JSON)
        timeout_secs: 4
        fallback: Sorry, I can't reach the order system right now.
        filler: One moment while I look that up.
        filler_after_secs: 1.5
      find_customer:
        description: Find the caller's account by phone number.
        python: shop_tools:find_customer     # module next to the flow file, or importable

A tool never raises into the call: a failure, bad arguments or a timeout give a `ToolOutcome` that
is not ok and carries the spoken fallback.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal
from urllib.parse import quote

import aiohttp
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictStr, field_validator, model_validator

from .schema import argument_problems
from .templates import MissingValue, lookup, render

ENV_VALUE = re.compile(r"\$\{([^}]*)\}")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
PYTHON_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
DEFAULT_FALLBACK = "Sorry, I couldn't do that just now."


class HttpSpec(BaseModel):
    """An HTTP request: arguments not used in the URL go in the query (GET, DELETE) or a JSON body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = Field("GET", description="HTTP method.")
    url: StrictStr = Field(description="http(s) URL; {{ name }} is an argument or state value, URL-encoded.")
    headers: dict[StrictStr, StrictStr] = Field(
        default_factory=dict, description="Request headers; ${NAME} is read from the environment per call."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("an absolute http:// or https:// URL")
        return value

    @field_validator("headers")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for header, text in value.items():
            for name in ENV_VALUE.findall(text):
                if not ENV_NAME.match(name):
                    raise ValueError(
                        f"header {header}: ${{{name}}} is not allowed; expected ${{NAME}} with NAME an environment variable name"
                    )
        return value


class ToolSpec(BaseModel):
    """One tool: what the model is told about it, how it runs, and what the caller hears if it fails."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: StrictStr = Field(min_length=1, description="What the tool does, for the model.")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON Schema of the arguments.",
    )
    python: StrictStr | None = Field(None, description="module:function to call (sync or async).")
    http: HttpSpec | None = Field(None, description="HTTP request to make.")
    fields: list[StrictStr] | dict[StrictStr, StrictStr] | None = Field(
        None, description="Result fields that come back (a list, or new name: dotted path); HTTP needs it."
    )
    timeout_secs: Annotated[float, Strict()] = Field(
        10.0, gt=0, le=120, description="Longest the tool may take."
    )
    fallback: StrictStr = Field(
        DEFAULT_FALLBACK, min_length=1, description="Spoken when the tool fails or times out."
    )
    filler: StrictStr | None = Field(
        None, description="Spoken when the tool takes longer than filler_after_secs."
    )
    filler_after_secs: Annotated[float, Strict()] = Field(
        1.0, gt=0, le=30, description="When the filler is spoken."
    )
    store_as: StrictStr | None = Field(
        None, description="State key for the result; default: the tool's name."
    )

    @field_validator("python")
    @classmethod
    def _python_ref(cls, value: str | None) -> str | None:
        if value is not None and not PYTHON_REF.match(value):
            raise ValueError("module:function, e.g. shop_tools:find_customer")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> ToolSpec:
        if (self.python is None) == (self.http is None):
            raise ValueError("give exactly one of python: module:function or http: {method, url}")
        if self.http is not None and self.fields is None:
            raise ValueError("an HTTP tool needs fields: the response fields it returns")
        return self

    def field_names(self) -> list[str] | None:
        """The keys a successful result has, when declared."""
        if self.fields is None:
            return None
        return list(self.fields) if isinstance(self.fields, dict) else list(self.fields)


LOCAL_MODULES = "_chroma_flow_tools."  # sys.modules prefix of tool modules loaded from a flow's folder


def forget_local_modules() -> None:
    """The next load of a flow's local tool modules runs them anew (a conversation test's fresh run)."""
    for name in [n for n in sys.modules if n.startswith(LOCAL_MODULES)]:
        del sys.modules[name]


def load_module_file(path: Path) -> ModuleType:
    """The module in a Python file, run once per process (until `forget_local_modules`). Raises
    ImportError naming the file and what it raised."""
    path = path.resolve()
    # Loaded under a name of its own so that two flows' `tools.py` do not replace each other.
    key = f"{LOCAL_MODULES}{abs(hash(str(path)))}.{path.stem}"
    module = sys.modules.get(key)
    if module is None:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses and the like look their module up while it runs
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:
            del sys.modules[key]
            if not isinstance(exc, Exception):
                raise
            raise ImportError(f"{path} raised {type(exc).__name__}: {exc}") from exc
    return module


def load_python(ref: str, base: Path) -> Callable:
    """The function `module:function` names; a module file under `base` (the flow's folder) wins over
    an importable module of the same name. Raises ImportError or AttributeError with the reason."""
    module_name, function_name = ref.split(":")
    local = base.joinpath(*module_name.split(".")).with_suffix(".py")
    if local.is_file():
        module = load_module_file(local)
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ImportError(
                f"{type(exc).__name__}: {exc} (looked for {local} and an importable module)"
            ) from exc
    function = getattr(module, function_name, None)
    if function is None:
        raise AttributeError(f"module {module_name!r} has no {function_name!r}")
    if not callable(function):
        raise AttributeError(f"{ref} is not callable")
    return function


def signature_problems(function: Callable, parameters: dict[str, Any]) -> list[str]:
    """Arguments the schema promises that the function could not take."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []
    params = signature.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    problems = [
        f"the function takes no argument {name!r}, which parameters declares"
        for name in parameters.get("properties", {})
        if name not in params or params[name].kind is inspect.Parameter.POSITIONAL_ONLY
    ]
    for name, param in params.items():
        declared = name in parameters.get("properties", {}) or name == "state"
        if (
            param.default is param.empty
            and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
            and not declared
        ):
            problems.append(f"the function needs argument {name!r}, which parameters does not declare")
    return problems


@dataclass(frozen=True)
class ToolOutcome:
    """What a tool call gave: ok with its result, or not ok with the reason and the fallback to speak."""

    ok: bool
    result: dict[str, Any]
    fallback: str | None = None


Say = Callable[[str], Awaitable[None]]


async def run_tool(
    name: str,
    tool: ToolSpec,
    arguments: Mapping[str, Any],
    state: Mapping[str, Any],
    *,
    function: Callable | None = None,
    say: Say | None = None,
) -> ToolOutcome:
    """Run one tool call; speak the tool's filler through `say` if it runs long. Never raises."""
    problems = argument_problems(tool.parameters, dict(arguments))
    if problems:
        return _failed(name, tool, "bad arguments: " + "; ".join(problems))
    declared = tool.parameters.get("properties", {})
    if extra := [k for k in arguments if k not in declared]:
        # A model may invent arguments; passing them on would break a Python signature or an API.
        logger.warning(f"tool {name}: ignoring undeclared arguments {', '.join(extra)}")
        arguments = {k: v for k, v in arguments.items() if k in declared}
    filler = asyncio.create_task(_filler(tool, say)) if tool.filler and say else None
    try:
        if tool.http is not None:
            call = _call_http(tool, arguments, state)
        else:
            call = _call_python(function, arguments, state)
        raw = await asyncio.wait_for(call, tool.timeout_secs)
        return ToolOutcome(True, _pick(tool, raw))
    except TimeoutError:
        return _failed(name, tool, f"timed out after {tool.timeout_secs:g} s")
    except Exception as exc:
        return _failed(name, tool, f"{type(exc).__name__}: {exc}")
    finally:
        if filler is not None:
            filler.cancel()


def _failed(name: str, tool: ToolSpec, reason: str) -> ToolOutcome:
    logger.warning(f"tool {name} failed: {reason}")
    return ToolOutcome(False, {"error": reason, "fallback": tool.fallback}, tool.fallback)


async def _filler(tool: ToolSpec, say: Say) -> None:
    await asyncio.sleep(tool.filler_after_secs)
    try:
        await say(tool.filler)
    except Exception:
        logger.exception("speaking a tool's filler failed")


async def _call_python(function: Callable, arguments: Mapping[str, Any], state: Mapping[str, Any]) -> Any:
    kwargs = dict(arguments)
    if "state" in inspect.signature(function).parameters:
        kwargs["state"] = dict(state)  # a copy: the flow's state changes only through results
    if inspect.iscoroutinefunction(function):
        return await function(**kwargs)
    # A sync tool may block (a database driver, requests); keep it off the event loop.
    return await asyncio.to_thread(function, **kwargs)


async def _call_http(tool: ToolSpec, arguments: Mapping[str, Any], state: Mapping[str, Any]) -> Any:
    spec = tool.http
    values = {**state, **arguments}
    try:
        url = render(spec.url, values, quote=lambda s: quote(s, safe=""))
    except MissingValue as exc:
        raise LookupError(f"the URL's {{{{ {exc.path} }}}} has no value in the arguments or state") from None
    used = {p.split(".")[0] for p in re.findall(r"\{\{\s*([\w.]+)\s*\}\}", spec.url)}
    rest = {k: v for k, v in arguments.items() if k not in used}
    headers = {name: _from_env(name, text) for name, text in spec.headers.items()}
    body = {"json": rest} if spec.method in ("POST", "PUT", "PATCH") else {"params": _query(rest)}
    timeout = aiohttp.ClientTimeout(total=tool.timeout_secs)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.request(spec.method, url, headers=headers, **body) as response:
            if response.status >= 400:
                raise RuntimeError(f"HTTP {response.status} from {spec.method} {url}")
            return await response.json(content_type=None)


def _from_env(header: str, text: str) -> str:
    def value(match: re.Match) -> str:
        found = os.environ.get(match.group(1))
        if found is None:
            raise LookupError(f"environment variable {match.group(1)} is not set (header {header})")
        return found

    return ENV_VALUE.sub(value, text)


def _query(arguments: Mapping[str, Any]) -> dict[str, str]:
    return {k: ("true" if v else "false") if isinstance(v, bool) else str(v) for k, v in arguments.items()}


def _pick(tool: ToolSpec, raw: Any) -> dict[str, Any]:
    """The declared fields of a result (missing ones as None); all of a mapping when none are declared."""
    if tool.fields is None:
        return dict(raw) if isinstance(raw, Mapping) else {"value": raw}
    paths = tool.fields if isinstance(tool.fields, dict) else {f: f for f in tool.fields}
    picked = {}
    for key, path in paths.items():
        try:
            picked[key] = lookup(raw, path) if isinstance(raw, Mapping) else None
        except MissingValue:
            picked[key] = None
    return picked
