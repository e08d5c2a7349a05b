"""The agent file: one `agent.yaml`, validated into an `AgentSpec` once, when the server starts.

    spec = load_agent("examples/agents/demo/agent.yaml")
    spec.model_source, spec.voice_profile.transcript, spec.response.max_frames

Every problem fails the load, all of them reported together, one per line, each naming the file,
line, field, value and what was expected:

    examples/agents/demo/agent.yaml:20: vad.aggressiveness: 7 is not allowed; expected an integer from 0 to 3

Paths in the file (a voice folder, a model folder) are relative to the file's folder; the spec holds
them resolved, so it means the same thing whatever the working directory. A voice named without a
path comes from the voice library (`load_agent(..., library=DIR)`, else voices.default_library()).
The sections (vad, turn, response, transports, outbound, records) are in `agent.spec_sections`;
problems are worded and located by `flows.problems`, as a flow file's and a scenario file's are.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    PrivateAttr,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from flows.file import FlowFile, load_flow
from flows.handlers import resolve_ref
from flows.problems import (
    FlowFileError,
    Lines,
    Located,
    Problem,
    YAMLFileError,
    from_validation,
    known_keys,
    problem,
    read_mapping,
    show,
    unknown_key,
)
from voices.library import LibraryError, VoiceLibrary
from voices.profile import Voice, VoiceError, load_voice

from .spec_sections import (
    DATABASE_URL_ENV,
    FRAME_SECONDS,
    ModelErrorSpec,
    NonEmptyText,
    Number,
    OutboundSpec,
    RecordsSpec,
    ResponseSpec,
    Section,
    SIPAuthSpec,
    SIPTransportSpec,
    SIPTrunkSpec,
    Text,
    TransportsSpec,
    TurnSpec,
    TwilioTransportSpec,
    VADSpec,
    WebRTCTransportSpec,
)

# The sections live in agent.spec_sections; the agent file's users import them from here.
__all__ = [
    "DATABASE_URL_ENV",
    "FRAME_SECONDS",
    "AgentFileError",
    "AgentSpec",
    "ModelErrorSpec",
    "OutboundSpec",
    "RecordsSpec",
    "ResponseSpec",
    "SIPAuthSpec",
    "SIPTransportSpec",
    "SIPTrunkSpec",
    "TransportsSpec",
    "TurnSpec",
    "TwilioTransportSpec",
    "VADSpec",
    "WebRTCTransportSpec",
    "load_agent",
]

HF_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
ENGINE_URL = re.compile(r"^grpc://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def _base(info: ValidationInfo) -> Path:
    return (info.context or {}).get("base") or Path.cwd()


def _flow_voices(flow: FlowFile, value: str, context: dict) -> dict[str, Voice]:
    """Each voice a flow node names, loaded now: a missing voice fails the agent file, not a call.
    A voice already loaded (the agent's own, or another node's) is not read again."""
    library = VoiceLibrary(context.get("library"))
    agent_voice = context.get("voice")
    voices: dict[str, Voice] = {}
    problems = []
    for node, ref in flow.voices.items():
        try:
            folder = str(library.resolve(ref))
            if folder not in voices:
                same = agent_voice is not None and str(agent_voice.folder) == folder
                voices[folder] = agent_voice if same else load_voice(folder)
        except LibraryError as exc:
            problems.append(f"node {node!r}: voice: {exc}")
        except VoiceError as exc:
            problems.append(f"node {node!r}: voice {ref!r} cannot be used: " + "; ".join(exc.problems))
    if problems:
        raise problem(f"{show(value)}: " + "; ".join(problems))
    return voices


def _resolve_model(value: str, base: Path) -> str:
    """'tiny', a Hugging Face id, or the absolute path of an existing checkpoint folder."""
    if value == "tiny":
        return value
    if not value.strip():
        raise problem(f"{show(value)} is empty; expected 'tiny', a checkpoint folder, or a Hugging Face id")
    path = (base / Path(value).expanduser()).resolve()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise problem(f"{show(value)} is a file ({path}); expected a checkpoint folder")
    # './weights' matches the id pattern too, but is clearly meant as a folder
    if value.startswith((".", "/", "~")):
        raise problem(f"{show(value)} does not exist (looked for {path}); expected a checkpoint folder")
    if HF_ID.match(value):
        return value
    raise problem(f"{show(value)} is not 'tiny', an existing folder, or a Hugging Face id 'org/name'")


class AgentSpec(Section):
    """One agent, as written in its agent.yaml."""

    name: NonEmptyText = Field(description="The agent's name, for logs and the web page.")
    model: NonEmptyText = Field(
        "tiny",
        description="'tiny' (seeded random miniature, for tests), a Hugging Face id 'org/name', or a checkpoint "
        "folder relative to the agent file.",
    )
    device: Text = Field("auto", description="auto, cpu, cuda or cuda:N.")
    engine: Text | None = Field(
        None,
        description="Where the model runs: absent, in this process (model and device above); or "
        "'grpc://HOST:PORT', an engine service (`chroma-agent engine`) shared with other call servers, whose "
        "own model then serves the calls.",
    )
    max_sessions: StrictInt = Field(
        32,
        ge=1,
        le=1000,
        description="Calls the model serves at once, all transports together; beyond it new calls get each "
        "transport's busy answer (a call must also fit its transport's max_calls).",
    )
    drain_seconds: Number = Field(
        30,
        ge=0,
        le=3600,
        description="On SIGTERM or POST /admin/drain: how long live calls may go on while the server takes no "
        "new ones; calls still live then hear a short goodbye and are hung up.",
    )
    voice: NonEmptyText = Field(
        description="The cloned voice the agent speaks in: a name from the voice library, or a voice folder "
        "(holding voice.yaml) relative to the agent file, such as ./voices/ava."
    )
    system_prompt: Text = Field("", description="What the agent is and how it behaves.")
    vad: VADSpec = Field(default_factory=VADSpec, description="Voice activity detection.")
    turn: TurnSpec = Field(default_factory=TurnSpec, description="End-of-turn detection.")
    response: ResponseSpec = Field(default_factory=ResponseSpec, description="Reply generation.")
    transports: TransportsSpec = Field(default_factory=TransportsSpec, description="Enabled transports.")
    outbound: OutboundSpec = Field(default_factory=OutboundSpec, description="Calls the agent places.")
    handlers: Text | None = Field(
        None,
        description="The flow's handlers module, as pipecat's Flow takes it: a Python file relative to this "
        "file, or an importable module name. Default: handlers.py beside the flow file, if there is one.",
    )
    records: RecordsSpec = Field(default_factory=RecordsSpec, description="Call records and recordings.")
    flow: Text | None = Field(
        None,
        description="A flow file (relative to this file): nodes, tools and telephony actions the calls follow. "
        "Checked with everything in it when the agent file loads.",
    )
    path: SkipJsonSchema[Path] = Field(
        exclude=True, description="The agent file, absolute; set by load_agent."
    )

    _voice: Voice | None = PrivateAttr(None)
    _library: Path | None = PrivateAttr(None)
    _flow: FlowFile | None = PrivateAttr(None)
    _flow_voices: dict[str, Voice] = PrivateAttr(default_factory=dict)

    @property
    def voice_folder(self) -> Path:
        """The voice's folder, absolute."""
        return Path(self.voice)

    @property
    def voice_profile(self) -> Voice:
        """The voice, loaded and checked when the file was."""
        if self._voice is None:
            self._voice = load_voice(self.voice_folder)
        return self._voice

    @property
    def voice_library(self) -> VoiceLibrary:
        """The library that voice names (here and in flows) come from."""
        return VoiceLibrary(self._library)

    @field_validator("voice", mode="before")
    @classmethod
    def _voice_is_a_reference(cls, value: Any) -> Any:
        if isinstance(value, dict):
            raise problem(
                "a mapping is not allowed; expected a voice name from the voice library (e.g. 'demo') or a voice "
                "folder holding voice.yaml (e.g. ./voices/demo): a voice is a folder with its consent record, "
                "made with `chroma-agent voice add`"
            )
        return value

    @field_validator("voice")
    @classmethod
    def _voice_loads(cls, value: str, info: ValidationInfo) -> str:
        context = info.context if info.context is not None else {}
        try:
            folder = VoiceLibrary(context.get("library")).resolve(value, _base(info))
            voice = load_voice(folder)
        except LibraryError as exc:
            raise problem(str(exc)) from None
        except VoiceError as exc:
            raise problem(f"{show(value)} cannot be used: " + "; ".join(exc.problems)) from None
        context["voice"] = voice  # kept by _keep_voice: loading twice would check the audio twice
        return str(folder)

    @field_validator("handlers")
    @classmethod
    def _handlers_found(cls, value: str | None, info: ValidationInfo) -> str | None:
        ref = resolve_ref(value, _base(info))
        if isinstance(ref, Path) and not ref.is_file():
            raise problem(f"{show(value)}: no such file (looked for {ref}); expected a Python file of flow "
                           "handlers relative to the agent file, or a module name")
        return None if ref is None else str(ref)

    @field_validator("flow")
    @classmethod
    def _flow_loads(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        path = (_base(info) / Path(value).expanduser()).resolve()
        try:
            flow = load_flow(path, handlers=info.data.get("handlers"))
        except FlowFileError as exc:
            raise problem(f"{show(value)}: the flow file has problems:\n  " + str(exc).replace("\n", "\n  ")) from None
        if info.context is not None:
            info.context["flow"] = flow
            info.context["flow_voices"] = _flow_voices(flow, value, info.context)
        return str(path)

    @property
    def flow_voices(self) -> dict[str, Voice]:
        """The voices the flow's nodes speak in, by absolute folder, loaded and checked with the file."""
        return self._flow_voices

    @property
    def flow_file(self) -> FlowFile | None:
        """The checked flow, loaded when the agent file was."""
        if self._flow is None and self.flow is not None:
            self._flow = load_flow(self.flow, handlers=self.handlers)
        return self._flow

    @model_validator(mode="after")
    def _keep_voice(self, info: ValidationInfo) -> AgentSpec:
        context = info.context or {}
        self._voice = context.get("voice")
        self._library = context.get("library")
        self._flow = context.get("flow")
        self._flow_voices = context.get("flow_voices", {})
        return self

    @property
    def model_source(self) -> str:
        """'tiny', the Hugging Face id, or the checkpoint folder's absolute path."""
        return self.model

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str, info: ValidationInfo) -> str:
        return _resolve_model(value, _base(info))

    @field_validator("engine")
    @classmethod
    def _engine_url(cls, value: str | None) -> str | None:
        match = ENGINE_URL.match(value) if value is not None else None
        if value is not None and (match is None or not 0 < int(match[2]) < 65536):
            raise problem(f"{show(value)} is not allowed; expected grpc://HOST:PORT (an engine service's address)")
        return value

    @field_validator("device", mode="before")
    @classmethod
    def _known_device(cls, value: Any) -> Any:
        if not isinstance(value, str) or not DEVICE.match(value):
            raise problem(f"{show(value)} is not allowed; expected auto, cpu, cuda or cuda:N")
        return value


# -- loading ----------------------------------------------------------------------------------------------


class AgentFileError(YAMLFileError):
    """A bad agent file; str() is every problem, one per line: `file:line: field: message`."""


def load_agent(path: str | Path, *, model: str | None = None, library: str | Path | None = None) -> AgentSpec:
    """Read and validate an agent file; `model` replaces the file's model (a relative folder is then
    relative to the working directory, as it comes from the command line). `library`: the voice
    library folder for a voice given by name (default: voices.library.default_library())."""
    root, data = read_mapping(Path(path), AgentFileError, "a mapping with name and voice")
    lines = Lines(root)
    problems: list[Problem] = []  # located by their place in the file
    data = dict(data)
    if "path" in data:  # set by load_agent, not by the file
        problems.append((("path",), unknown_key("path", known_keys(AgentSpec))))
        del data["path"]
    overridden: list[Located] = []  # from the command line: no line
    if model is not None:
        data.pop("model", None)
        try:
            data["model"] = _resolve_model(str(model), Path.cwd())
        except PydanticCustomError as exc:
            overridden.append((None, "model", f"{exc.context['message']} (given as the model override)"))
    try:
        spec = AgentSpec.model_validate(
            {**data, "path": Path(path).resolve()},
            context={"base": Path(path).resolve().parent, "library": library},
        )
    except ValidationError as exc:
        problems += from_validation(exc, model=AgentSpec)
    located = lines.duplicates + overridden + lines.locate(problems)
    if located:
        raise AgentFileError(path, located)
    return spec
