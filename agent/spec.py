"""The agent file: one `agent.yaml`, validated into an `AgentSpec` once, when the server starts.

    spec = load_agent("examples/agents/demo/agent.yaml")
    spec.model_source, spec.voice_profile.transcript, spec.response.max_frames

Every problem fails the load, all of them reported together, one per line, each naming the file,
line, field, value and what was expected:

    examples/agents/demo/agent.yaml:20: vad.aggressiveness: 7 is not allowed; expected an integer from 0 to 3

Paths in the file (a voice folder, a model folder) are relative to the file's folder; the spec holds
them resolved, so it means the same thing whatever the working directory. A voice named without a
path comes from the voice library (`load_agent(..., library=DIR)`, else voices.default_library()).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from flows.actions import E164
from flows.file import FlowFile, load_flow
from flows.handlers import resolve_ref
from flows.problems import FlowFileError
from processors.chroma.rates import FRAME_SECONDS
from voices.library import LibraryError, VoiceLibrary
from voices.profile import Voice, VoiceError, load_voice

HF_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
ENGINE_URL = re.compile(r"^grpc://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")

Text = Annotated[str, Strict()]
NonEmptyText = Annotated[str, Strict(), StringConstraints(strip_whitespace=True, min_length=1)]
Number = Annotated[float, Strict()]  # strict still takes an int where a float is expected, not "0.5" or true


def _problem(message: str, *, on_parent: bool = False) -> PydanticCustomError:
    """A validator's error whose message is already in our words; `on_parent` reports it on the enclosing
    section (a rule about two of its fields)."""
    return PydanticCustomError("agent_file", "{message}", {"message": message, "on_parent": on_parent})


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
        raise _problem(f"{_show(value)}: " + "; ".join(problems))
    return voices


def _resolve_model(value: str, base: Path) -> str:
    """'tiny', a Hugging Face id, or the absolute path of an existing checkpoint folder."""
    if value == "tiny":
        return value
    if not value.strip():
        raise _problem(f"{_show(value)} is empty; expected 'tiny', a checkpoint folder, or a Hugging Face id")
    path = (base / Path(value).expanduser()).resolve()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise _problem(f"{_show(value)} is a file ({path}); expected a checkpoint folder")
    # './weights' matches the id pattern too, but is clearly meant as a folder
    if value.startswith((".", "/", "~")):
        raise _problem(f"{_show(value)} does not exist (looked for {path}); expected a checkpoint folder")
    if HF_ID.match(value):
        return value
    raise _problem(f"{_show(value)} is not 'tiny', an existing folder, or a Hugging Face id 'org/name'")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VADSpec(_Section):
    """Voice activity detection: when the caller starts and stops speaking."""

    analyzer: Literal["webrtc", "silero"] = Field("webrtc", description="Which voice activity detector.")
    aggressiveness: StrictInt = Field(2, ge=0, le=3, description="webrtcvad mode; higher rejects more noise.")
    frame_ms: Literal[10, 20, 30] = Field(20, description="webrtcvad frame length in milliseconds.")
    confidence: Number = Field(0.7, gt=0, le=1, description="Speech probability needed to count a frame.")
    start_secs: Number = Field(0.2, ge=0, le=2, description="Speech needed before the caller starts a turn.")
    stop_secs: Number = Field(
        0.2,
        ge=0,
        le=5,
        description="Silence before VAD reports a stop; short, it only wakes the turn detector.",
    )
    min_volume: Number = Field(0.6, ge=0, le=1, description="Quietest audio that can count as speech.")


class TurnSpec(_Section):
    """End of the caller's turn: when the agent answers."""

    detector: Literal["smart_turn", "silence"] = Field(
        "smart_turn", description="How the end of a turn is found."
    )
    silence_secs: Number = Field(
        0.8, ge=0.1, le=5, description="Silence that ends a turn (silence detector; fallback for smart_turn)."
    )


class ModelErrorSpec(_Section):
    """What the caller hears when the model fails on a reply, instead of silence."""

    say: NonEmptyText = Field(
        "I'm sorry, something went wrong on my side. Could you say that again?",
        description="Said in place of a reply that failed. Rendered in the agent's voice when the agent loads "
        "and kept, so it plays even while the model is failing.",
    )
    hang_up_after: StrictInt = Field(
        3,
        ge=1,
        le=10,
        description="Replies failing in a row that end the call: the last one says the goodbye, then the agent "
        "hangs up, rather than leaving the caller to talk to a model that keeps failing.",
    )
    goodbye: NonEmptyText = Field(
        "I'm sorry, I'm having technical trouble. Please call again in a little while. Goodbye.",
        description="Said before the agent hangs up after hang_up_after failed replies; rendered with `say`.",
    )


class ResponseSpec(_Section):
    """How the agent's reply is generated and streamed."""

    max_seconds: Number = Field(30, ge=1, le=300, description="Cap on one reply's audio, in seconds.")
    chunk_frames: StrictInt = Field(
        2, ge=1, le=4, description="Audio frames (80 ms each) per streamed chunk."
    )
    lookahead: StrictInt = Field(3, ge=1, le=8, description="Thinker tokens generated ahead of the audio.")
    temperature: Number = Field(
        0.0, ge=0, le=2, description="Sampling temperature; 0 is greedy and deterministic."
    )
    top_k: StrictInt = Field(50, ge=1, le=1000, description="Sample from this many most likely tokens.")
    allow_interruptions: StrictBool = Field(True, description="Whether the caller can barge in on a reply.")
    on_model_error: ModelErrorSpec = Field(
        default_factory=ModelErrorSpec, description="What the agent says when its model fails on a reply."
    )

    @property
    def max_frames(self) -> int:
        """max_seconds in 80 ms frames, rounded down."""
        return int(round(self.max_seconds * 1000, 6) // (FRAME_SECONDS * 1000))


class WebRTCTransportSpec(_Section):
    """Browsers and apps, over WebRTC."""

    enabled: StrictBool = Field(True, description="Accept WebRTC calls.")


class TwilioTransportSpec(_Section):
    """Phone numbers, over Twilio Media Streams."""

    enabled: StrictBool = Field(False, description="Accept Twilio calls.")
    public_url: Text | None = Field(
        None,
        description="The https:// base URL Twilio reaches this server at (behind a proxy, the proxy's); "
        "`serve --public-url` overrides it. Signatures are checked against it.",
    )
    account_sid: Text | None = Field(
        None, description="Account SID for hang-up and transfer over Twilio's REST API; else TWILIO_ACCOUNT_SID."
    )
    auth_token: Text | None = Field(
        None,
        description="Auth token that signs Twilio's requests; else TWILIO_AUTH_TOKEN. Prefer the environment "
        "variable: agent files end up in version control.",
    )
    max_calls: StrictInt = Field(20, ge=1, le=1000, description="Calls at once; more are rejected as busy.")
    from_number: Text | None = Field(
        None, description="Caller ID for calls the agent places over Twilio: a Twilio number, E.164 (+15557654321)."
    )
    api_url: Text = Field(
        "https://api.twilio.com",
        description="Twilio's REST API: a regional edge (https://api.dublin.ie1.twilio.com) or a local stand-in.",
    )

    @field_validator("from_number")
    @classmethod
    def _e164(cls, value: str | None) -> str | None:
        if value is not None and not E164.match(value):
            raise _problem(f"{_show(value)} is not allowed; expected an E.164 number such as +15557654321")
        return value

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/?#\s]+/?$", value):
            raise _problem(f"{_show(value)} is not allowed; expected http(s)://host[:port] with no path")
        return value.rstrip("/")

    @field_validator("public_url")
    @classmethod
    def _absolute_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/?#\s]+(/[^?#\s]*)?$", value):
            raise _problem(f"{_show(value)} is not allowed; expected an absolute http(s) URL with no query")
        return value


class SIPAuthSpec(_Section):
    """Digest authentication asked of every INVITE."""

    realm: NonEmptyText = Field(description="Realm named in the challenge, usually the agent's domain.")
    username: NonEmptyText = Field(description="User name the trunk or PBX authenticates as.")
    password_env: NonEmptyText = Field(
        "SIP_PASSWORD", description="Environment variable holding the password (never in the agent file)."
    )
    algorithm: Literal["MD5", "SHA-256"] = Field("MD5", description="Digest algorithm: MD5 or SHA-256.")


class SIPTrunkSpec(_Section):
    """The SIP trunk that outbound calls to phone numbers go through."""

    address: NonEmptyText = Field(description="The trunk's SIP address, host or host:port (UDP; default port 5060).")
    username: Text | None = Field(None, description="User name for the trunk's digest challenge (401/407).")
    password_env: NonEmptyText = Field(
        "SIP_TRUNK_PASSWORD", description="Environment variable holding the trunk password (never in the agent file)."
    )
    caller_id: Text | None = Field(None, description="The number calls show as coming from (the From user).")
    realm: Text | None = Field(None, description="Answer only challenges for this realm; default: any the trunk names.")

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if not re.match(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$", value):
            raise _problem(f"{_show(value)} is not allowed; expected host or host:port, such as sip.example.com:5060")
        return value


class SIPTransportSpec(_Section):
    """Any SIP trunk or PBX, over SIP and RTP."""

    enabled: StrictBool = Field(False, description="Accept SIP calls.")
    host: NonEmptyText = Field("127.0.0.1", description="Address the SIP and RTP sockets bind to.")
    port: StrictInt = Field(5060, ge=1, le=65535, description="SIP port (UDP).")
    public_address: Text | None = Field(
        None, description="Address put in Contact and SDP when the trunk reaches us through NAT; default: host."
    )
    rtp_ports: tuple[StrictInt, StrictInt] = Field(
        (20000, 20999), description="First and last RTP port; each call takes an even port and the next one."
    )
    codecs: list[Literal["PCMU", "PCMA"]] = Field(
        ["PCMU", "PCMA"], min_length=1, description="Codecs accepted, in our order of preference."
    )
    allow: list[NonEmptyText] = Field(
        ["127.0.0.1", "::1"],
        description="Source addresses or networks (CIDR) allowed to call; [] allows anyone (then set auth).",
    )
    auth: SIPAuthSpec | None = Field(None, description="Digest authentication for INVITEs; off when absent.")
    max_calls: StrictInt = Field(20, ge=1, le=1000, description="Calls at once; more get 486 Busy Here.")
    trunk: SIPTrunkSpec | None = Field(None, description="Outbound calls to phone numbers go through this trunk.")

    @field_validator("rtp_ports")
    @classmethod
    def _port_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        first, last = value
        if not (1024 <= first < last <= 65535):
            raise _problem(f"{list(value)} is not allowed; expected [first, last] with 1024 <= first < last <= 65535")
        return value

    @field_validator("allow")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip())
            except ValueError:
                raise _problem(f"{_show(entry)} is not an IP address or network (e.g. 10.0.0.0/8)") from None
        return value


class TransportsSpec(_Section):
    """Which ways calls can reach the agent."""

    webrtc: WebRTCTransportSpec = Field(default_factory=WebRTCTransportSpec, description="WebRTC calls.")
    twilio: TwilioTransportSpec = Field(default_factory=TwilioTransportSpec, description="Twilio calls.")
    sip: SIPTransportSpec = Field(default_factory=SIPTransportSpec, description="SIP calls.")


class OutboundSpec(_Section):
    """Calls the agent places (`chroma-agent dial`, POST /api/calls)."""

    max_calls: StrictInt = Field(5, ge=1, le=1000, description="Outbound calls at once; more are refused.")
    per_minute: StrictInt = Field(30, ge=1, le=10000, description="Outbound calls placed per minute, at most.")
    ring_timeout: Number = Field(30, gt=0, le=300, description="Seconds to ring before giving up (no-answer).")
    on_machine: Literal["hang_up", "leave_message"] = Field(
        "hang_up", description="What to do when an answering machine answers: hang up, or speak `message` after the beep."
    )
    message: Text = Field("", description="What the agent says to an answering machine, after its beep.")

    @model_validator(mode="after")
    def _message_when_leaving_one(self) -> OutboundSpec:
        if self.on_machine == "leave_message" and not self.message.strip():
            raise _problem("on_machine is leave_message but message is empty; expected the words to leave")
        return self


DATABASE_URL_ENV = "CHROMA_AGENTS_DATABASE_URL"


class RecordsSpec(_Section):
    """Call records: every call's transcript, events and (optionally) recording, kept in a database."""

    enabled: StrictBool = Field(True, description="Keep a record of every call.")
    database: NonEmptyText = Field(
        "calls.db",
        description="An SQLite file (relative to this file) or a postgresql:// URL; the environment variable "
        f"{DATABASE_URL_ENV} overrides it.",
    )
    recordings: NonEmptyText | None = Field(
        None, description="A folder (relative to this file) for one stereo WAV per call; off when absent."
    )
    retention_days: StrictInt | None = Field(
        None, ge=1, le=36500, description="Delete records and recordings older than this; off when absent."
    )

    def database_url(self, base: Path) -> str:
        """Where records go: the environment's URL, a postgresql:// URL, or the SQLite file's absolute path."""
        url = os.environ.get(DATABASE_URL_ENV, "").strip() or self.database
        if url.startswith(("postgresql://", "postgres://", "sqlite:")):
            return url
        return str((base / Path(url).expanduser()).resolve())

    def recordings_folder(self, base: Path) -> Path | None:
        return None if self.recordings is None else (base / Path(self.recordings).expanduser()).resolve()


class AgentSpec(_Section):
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
            raise _problem(
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
            raise _problem(str(exc)) from None
        except VoiceError as exc:
            raise _problem(f"{_show(value)} cannot be used: " + "; ".join(exc.problems)) from None
        context["voice"] = voice  # kept by _keep_voice: loading twice would check the audio twice
        return str(folder)

    @field_validator("handlers")
    @classmethod
    def _handlers_found(cls, value: str | None, info: ValidationInfo) -> str | None:
        ref = resolve_ref(value, _base(info))
        if isinstance(ref, Path) and not ref.is_file():
            raise _problem(f"{_show(value)}: no such file (looked for {ref}); expected a Python file of flow "
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
            raise _problem(f"{_show(value)}: the flow file has problems:\n  " + str(exc).replace("\n", "\n  ")) from None
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
            raise _problem(f"{_show(value)} is not allowed; expected grpc://HOST:PORT (an engine service's address)")
        return value

    @field_validator("device", mode="before")
    @classmethod
    def _known_device(cls, value: Any) -> Any:
        if not isinstance(value, str) or not DEVICE.match(value):
            raise _problem(f"{_show(value)} is not allowed; expected auto, cpu, cuda or cuda:N")
        return value


# -- loading ----------------------------------------------------------------------------------------------

Loc = tuple[Any, ...]
Problem = tuple[int | None, str, str]  # line (1-based, None when not from a line), field path, message


class AgentFileError(ValueError):
    """A bad agent file; str() is every problem, one per line: `file:line: field: message`."""

    def __init__(self, path: str | Path, errors: list[Problem]):
        self.path = Path(path)
        self.errors = sorted(errors, key=lambda e: e[0] or 0)
        super().__init__("\n".join(_format(path, *e) for e in self.errors))


def _format(path: str | Path, line: int | None, field: str, message: str) -> str:
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: {field}: {message}" if field else f"{where}: {message}"


def load_agent(path: str | Path, *, model: str | None = None, library: str | Path | None = None) -> AgentSpec:
    """Read and validate an agent file; `model` replaces the file's model (a relative folder is then
    relative to the working directory, as it comes from the command line). `library`: the voice
    library folder for a voice given by name (default: voices.library.default_library())."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AgentFileError(
            path, [(None, "", f"cannot be read ({reason}); expected a UTF-8 YAML file")]
        ) from None
    try:
        node, data = _parse(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = f"{exc.context}, {exc.problem}" if exc.context else exc.problem
        raise AgentFileError(
            path, [(mark.line + 1 if mark else None, "", f"invalid YAML: {detail}")]
        ) from None
    except yaml.YAMLError as exc:
        raise AgentFileError(path, [(None, "", f"invalid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        found = "the file is empty" if node is None else f"{_show(data)} at the top level"
        line = node.start_mark.line + 1 if node is not None else None
        raise AgentFileError(path, [(line, "", f"{found}; expected a mapping with name and voice")])

    keys, values, errors = _lines(node)
    data = dict(data)
    if "path" in data:  # set by load_agent, not by the file
        errors.append((keys[("path",)], "path", _unknown_key(("path",))))
        del data["path"]
    if model is not None:
        data.pop("model", None)
        try:
            data["model"] = _resolve_model(str(model), Path.cwd())
        except PydanticCustomError as exc:
            errors.append((None, "model", f"{exc.context['message']} (given as the model override)"))
    try:
        spec = AgentSpec.model_validate(
            {**data, "path": Path(path).resolve()},
            context={"base": Path(path).resolve().parent, "library": library},
        )
    except ValidationError as exc:
        errors += [_problem_from(e, keys, values) for e in exc.errors()]
    if errors:
        raise AgentFileError(path, errors)
    return spec


def _parse(text: str) -> tuple[yaml.Node | None, Any]:
    """The document's node tree (for line numbers) and its Python value."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def _lines(node: yaml.Node) -> tuple[dict[Loc, int], dict[Loc, int], list[Problem]]:
    """Line of each key and of each non-empty scalar value, by field path; and duplicate keys, which
    YAML itself lets through with the last one winning."""
    keys: dict[Loc, int] = {}
    values: dict[Loc, int] = {}
    duplicates: list[Problem] = []
    todo: list[tuple[Loc, yaml.Node]] = [((), node)]
    seen: set[int] = set()  # aliases can make the tree a graph
    while todo:
        loc, mapping = todo.pop()
        if not isinstance(mapping, yaml.MappingNode) or id(mapping) in seen:
            continue
        seen.add(id(mapping))
        for key_node, value_node in mapping.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            here = (*loc, key_node.value)
            if here in keys:
                duplicates.append(
                    (
                        key_node.start_mark.line + 1,
                        _dotted(here),
                        f"duplicate key; first given on line {keys[here]}",
                    )
                )
                continue
            keys[here] = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.ScalarNode) and value_node.value != "":
                values[here] = value_node.start_mark.line + 1
            todo.append((here, value_node))
    return keys, values, duplicates


def _problem_from(error: dict[str, Any], keys: dict[Loc, int], values: dict[Loc, int]) -> Problem:
    loc, kind, ctx = tuple(error["loc"]), error["type"], error.get("ctx") or {}
    if kind == "agent_file":
        loc = loc[:-1] if ctx["on_parent"] else loc
        message = ctx["message"]
    elif kind in ("extra_forbidden", "invalid_key"):  # invalid_key: a key that is not a string, like `1:`
        message = _unknown_key(loc)
    else:
        field = _field_at(loc)
        if field is None:
            message = f"{_show(error['input'])} is not allowed ({error['msg'][0].lower()}{error['msg'][1:]})"
        elif kind == "missing":
            message = f"missing; expected {_expected(field)}"
        else:
            message = f"{_show(error['input'])} is not allowed; expected {_expected(field)}"
    at = tuple(str(part) for part in loc)  # the node map holds keys as written
    line = values.get(at) if kind not in ("missing", "extra_forbidden", "invalid_key") else None
    while line is None and at:
        line, at = keys.get(at), at[:-1]
    return (line or 1, _dotted(loc), message)


def _field_at(loc: Loc) -> FieldInfo | None:
    section, field = AgentSpec, None
    for part in loc:
        if (
            not (isinstance(section, type) and issubclass(section, BaseModel))
            or part not in section.model_fields
        ):
            return None
        field = section.model_fields[part]
        section = _unwrap(field.annotation)
    return field


def _unknown_key(loc: Loc) -> str:
    parent = _field_at(loc[:-1]) if loc[:-1] else None
    section = _unwrap(parent.annotation) if parent else AgentSpec
    known = [name for name, field in section.model_fields.items() if not field.exclude]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    return (
        f"unknown key; did you mean {close[0]!r}?"
        if close
        else f"unknown key; expected one of {', '.join(known)}"
    )


def _unwrap(annotation: Any) -> Any:
    """X from `X | None` and from `Annotated[X, ...]`."""
    while True:
        if get_origin(annotation) in (Union, UnionType):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        elif get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        else:
            return annotation


def _expected(field: FieldInfo) -> str:
    """What a field takes, in words, from its type and constraints."""
    kind = _unwrap(field.annotation)
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(_show(v) for v in get_args(kind))
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return "a mapping with keys " + ", ".join(kind.model_fields)
    if kind is bool:
        return "true or false"
    noun = {int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(kind, "a value")
    limits = {
        n: getattr(m, n)
        for m in field.metadata
        for n in ("ge", "gt", "le", "lt", "min_length")
        if getattr(m, n, None) is not None
    }
    if limits.get("min_length"):
        noun = f"a non-empty {noun.removeprefix('a ').removeprefix('n ')}"
    if "ge" in limits and "le" in limits:
        return f"{noun} from {limits['ge']} to {limits['le']}"
    words = {"gt": "greater than", "ge": "at least", "lt": "less than", "le": "at most"}
    bounds = [f"{words[n]} {limits[n]}" for n in words if n in limits]
    return " ".join([noun, " and ".join(bounds)]) if bounds else noun


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    shown = repr(value) if isinstance(value, (str, int, float)) else str(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc)
