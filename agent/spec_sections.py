"""The agent file's sections: how the agent listens and replies (vad, turn, response), the ways calls
reach it (transports), the calls it places (outbound) and what it keeps of them (records).
`agent.spec` puts them together into the whole file, `AgentSpec`."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StringConstraints,
    field_validator,
    model_validator,
)

from flows.problems import problem, show
from processors.chroma.rates import FRAME_SECONDS
from transports.addresses import E164

Text = Annotated[str, Strict()]
NonEmptyText = Annotated[str, Strict(), StringConstraints(strip_whitespace=True, min_length=1)]
Number = Annotated[float, Strict()]  # strict still takes an int where a float is expected, not "0.5" or true


class Section(BaseModel):
    """A section of the agent file: unknown keys are errors, and a loaded spec does not change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class VADSpec(Section):
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


class TurnSpec(Section):
    """End of the caller's turn: when the agent answers."""

    detector: Literal["smart_turn", "silence"] = Field(
        "smart_turn", description="How the end of a turn is found."
    )
    silence_secs: Number = Field(
        0.8, ge=0.1, le=5, description="Silence that ends a turn (silence detector; fallback for smart_turn)."
    )


class ModelErrorSpec(Section):
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


class ResponseSpec(Section):
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


class WebRTCTransportSpec(Section):
    """Browsers and apps, over WebRTC."""

    enabled: StrictBool = Field(True, description="Accept WebRTC calls.")


class TwilioTransportSpec(Section):
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
            raise problem(f"{show(value)} is not allowed; expected an E.164 number such as +15557654321")
        return value

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/?#\s]+/?$", value):
            raise problem(f"{show(value)} is not allowed; expected http(s)://host[:port] with no path")
        return value.rstrip("/")

    @field_validator("public_url")
    @classmethod
    def _absolute_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/?#\s]+(/[^?#\s]*)?$", value):
            raise problem(f"{show(value)} is not allowed; expected an absolute http(s) URL with no query")
        return value


class SIPAuthSpec(Section):
    """Digest authentication asked of every INVITE."""

    realm: NonEmptyText = Field(description="Realm named in the challenge, usually the agent's domain.")
    username: NonEmptyText = Field(description="User name the trunk or PBX authenticates as.")
    password_env: NonEmptyText = Field(
        "SIP_PASSWORD", description="Environment variable holding the password (never in the agent file)."
    )
    algorithm: Literal["MD5", "SHA-256"] = Field("MD5", description="Digest algorithm: MD5 or SHA-256.")


class SIPTrunkSpec(Section):
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
            raise problem(f"{show(value)} is not allowed; expected host or host:port, such as sip.example.com:5060")
        return value


class SIPTransportSpec(Section):
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
            raise problem(f"{list(value)} is not allowed; expected [first, last] with 1024 <= first < last <= 65535")
        return value

    @field_validator("allow")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip())
            except ValueError:
                raise problem(f"{show(entry)} is not an IP address or network (e.g. 10.0.0.0/8)") from None
        return value


class TransportsSpec(Section):
    """Which ways calls can reach the agent."""

    webrtc: WebRTCTransportSpec = Field(default_factory=WebRTCTransportSpec, description="WebRTC calls.")
    twilio: TwilioTransportSpec = Field(default_factory=TwilioTransportSpec, description="Twilio calls.")
    sip: SIPTransportSpec = Field(default_factory=SIPTransportSpec, description="SIP calls.")


class OutboundSpec(Section):
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
            raise problem("on_machine is leave_message but message is empty; expected the words to leave")
        return self


DATABASE_URL_ENV = "CHROMA_AGENTS_DATABASE_URL"


class RecordsSpec(Section):
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
