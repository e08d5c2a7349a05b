"""The `chroma-agent` command line.

    chroma-agent serve examples/agents/demo/agent.yaml            # talk to it at http://127.0.0.1:8080
    chroma-agent drain --url http://127.0.0.1:8080 --wait 60      # no new calls; live ones finish; it exits
    chroma-agent call AGENT.yaml --input caller.wav --output call.wav
    chroma-agent speak --model tiny --voice-audio ref.wav --voice-text "..." \\
        --input user.wav --output reply.wav
    chroma-agent flow check examples/flows/customer_service/flow.yaml   # exit 1 and list every problem
    chroma-agent dial AGENT.yaml --to sip:alice@127.0.0.1:5080 --state appointment="Tue 10:00"
    chroma-agent voice add ava --audio ava.flac --transcript "..." --consent-by "Ava Smith"   # and list, check, remove
    chroma-agent engine --model tiny --port 7400     # the model as a service: agent files say engine: grpc://...
    chroma-agent calls list --db AGENT.yaml --since 2h        # and show ID, export, prune

Each subcommand is one `_add_<name>(subparsers)` function that declares its flags and sets
`run` to a function taking the parsed args and returning an exit code; list it in
`SUBCOMMANDS`. Exit codes: 0 done; 1 problems found (a flow or voice with problems, a call that
failed); 2 a usage error or a missing or unusable file (a `UsageError` raised anywhere in a
command prints one line; argparse's own errors print the subcommand's usage).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from processors.audio_io import AudioFileError, read_audio, read_audio_native, write_wav

PROG = "chroma-agent"
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
# Our packages log at the chosen level; everything else (pipecat's import banner and debug lines,
# aiortc, uvicorn's access details) only from WARNING, unless asked for with -v or --log-level.
OWN_PACKAGES = ("agent", "transports", "processors", "voices", "flows", "records", "__main__")
THIRD_PARTY_LEVEL = "WARNING"


class UsageError(Exception):
    """Something the user can fix (a flag, a file); printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse hands a subcommand's unknown flags up to the top-level parser, which reports them under
    its own usage line; here the subcommand that was given them reports them, under its usage."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


# -- speak -------------------------------------------------------------------


def _add_speak(subparsers) -> None:
    p = subparsers.add_parser(
        "speak",
        help="answer one recorded user turn in a cloned voice, streamed, and write the reply as WAV",
        description="Answer one recorded user turn (USER.wav) in the voice of REF.wav and write the "
        "reply to a 24 kHz 16-bit mono WAV, printing time to first audio and real-time factor.",
    )
    p.add_argument("--model", default="tiny", help="'tiny', a checkpoint folder or a Hugging Face id (default: tiny)")
    p.add_argument("--voice-audio", required=True, metavar="REF.wav",
                   help="reference recording of the voice (WAV, FLAC, OGG or MP3; any rate and channels)")
    p.add_argument("--voice-text", required=True, metavar="TEXT", help="transcript of the reference recording")
    p.add_argument("--consent-by", required=True, metavar="WHO",
                   help="who consented to this voice being cloned (as for `voice add`)")
    p.add_argument("--input", required=True, metavar="USER.wav", help="the user's turn (WAV, FLAC, OGG or MP3; any rate)")
    p.add_argument("--output", required=True, metavar="REPLY.wav", help="where to write the reply (24 kHz 16-bit mono)")
    p.add_argument("--system-prompt", default="", metavar="TEXT", help="system prompt for the conversation")
    p.add_argument("--max-frames", type=int, default=250, metavar="N", help="cap on reply frames, 80 ms each (default: 250)")
    p.add_argument("--chunk-frames", type=int, default=2, metavar="N", help="frames per streamed chunk, 1 to 4 (default: 2)")
    p.add_argument("--device", default=None, metavar="cpu|cuda", help="device (default: cuda if available, else cpu)")
    _add_verbose(p)
    p.set_defaults(run=_run_speak)


def _run_speak(args: argparse.Namespace) -> int:
    from processors.chroma.config import LISTEN_RATE, SAMPLE_RATE

    if not 1 <= args.chunk_frames <= 4:
        raise UsageError(f"--chunk-frames is {args.chunk_frames}, expected 1 to 4")
    if args.max_frames < 1:
        raise UsageError(f"--max-frames is {args.max_frames}, expected a positive number of frames")
    if not args.voice_text.strip():
        raise UsageError("--voice-text is empty, expected the transcript of --voice-audio")
    consent = _consent(args.consent_by)
    output = Path(args.output)
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: folder {output.parent} does not exist")
    if output.is_dir():
        raise UsageError(f"--output {output}: is a folder, expected a file name for the reply WAV")
    device = _device(args.device)
    voice_audio = _read(args.voice_audio, "--voice-audio", SAMPLE_RATE)
    user_audio = _read(args.input, "--input", LISTEN_RATE)
    print(f"voice: {args.voice_audio}, cloned with the consent of {consent.given_by}")

    model = _load(args.model, device)
    print(f"model: {model.source} on {model.device} ({str(model.dtype).removeprefix('torch.')})")
    if model.config.is_tiny:
        print("note: 'tiny' is a random miniature for tests; it produces noise, not speech")

    session = model.new_session(
        voice=(voice_audio, args.voice_text),
        system_prompt=args.system_prompt,
        chunk_frames=args.chunk_frames,
        max_frames=args.max_frames,
    )
    reply = asyncio.run(_stream(session, user_audio))
    frames, audio = reply["frames"], reply["audio"]
    write_wav(output, audio, SAMPLE_RATE)

    audio_seconds = audio.size / SAMPLE_RATE
    ttfa = reply["first_audio_s"]
    print(f"time to first audio: {ttfa * 1000:.0f} ms" if ttfa is not None else "time to first audio: n/a (no audio)")
    print(f"frames: {frames}")
    print(f"audio: {audio_seconds:.2f} s")
    print(f"generation wall time: {reply['wall_s']:.2f} s")
    rtf = f"{reply['wall_s'] / audio_seconds:.2f}" if audio_seconds > 0 else "n/a (no audio)"
    print(f"real-time factor: {rtf} (wall time / audio seconds; below 1 is faster than real time)")
    if frames >= args.max_frames:
        print(f"note: the reply was cut at --max-frames {args.max_frames}")
    print(f"reply text: {reply['text']!r}")
    print(f"wrote {output}")
    return 0


async def _stream(session, user_audio: np.ndarray) -> dict:
    pieces, frames, text, first = [], 0, "", None
    started = time.perf_counter()
    async for chunk in session.respond(user_audio):
        if first is None:
            first = time.perf_counter() - started
        pieces.append(chunk.audio)
        frames, text = chunk.frames[1], chunk.text
    wall = time.perf_counter() - started
    audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return {"audio": audio, "frames": frames, "text": text, "first_audio_s": first, "wall_s": wall}


# -- serve / call ---------------------------------------------------------------------


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run an agent: a web page to talk to it over WebRTC, health and metrics",
        description="Load AGENT.yaml and its model once, then serve the agent: a page at / to talk to it "
        "from a browser (WebRTC), /healthz and /metrics (Prometheus).",
    )
    p.add_argument("agent", metavar="AGENT.yaml", help="the agent file")
    p.add_argument("--model", default=None, help="override the agent's model: 'tiny', a checkpoint folder or a Hugging Face id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    p.add_argument(
        "--public-url",
        default=None,
        metavar="URL",
        help="the https:// base URL Twilio reaches this server at (overrides transports.twilio.public_url)",
    )
    _add_log_level(p)
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"--port is {args.port}, expected 1 to 65535")
    spec = _spec(args.agent, args.model)
    # Before the model loads (minutes for real weights): a port in use fails now, not after.
    _check_port(args.host, args.port, socket.SOCK_STREAM, f"--port {args.port} (HTTP)")
    sip = spec.transports.sip
    if sip.enabled:
        _check_port(sip.host, sip.port, socket.SOCK_DGRAM, f"transports.sip.port {sip.port} (SIP, UDP) in {args.agent}")
    from .server import serve

    runtime = _runtime_for(spec, args.agent)
    print(f"agent {runtime.spec.name!r}: model {runtime.model.source} on {runtime.model.device}")
    print(f"open http://{args.host}:{args.port}/ to talk to it")
    from .lines.twilio import TwilioConfigError

    try:
        serve(runtime, host=args.host, port=args.port, public_url=args.public_url)
    except TwilioConfigError as e:
        raise UsageError(str(e)) from e
    return 0


def _add_drain(subparsers) -> None:
    p = subparsers.add_parser(
        "drain",
        help="drain a running server: no new calls, live ones finish, then it exits",
        description="POST /admin/drain to a running server (with CHROMA_AGENTS_ADMIN_TOKEN): it takes no new "
        "calls, lets live ones finish for up to its drain_seconds, says goodbye to the rest and exits. "
        "Same as sending it SIGTERM; for a Kubernetes preStop hook or a server on another host.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the server's base URL (default: http://127.0.0.1:8080)")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="then wait up to this long for the server to exit (default: do not wait)")
    p.set_defaults(run=_run_drain)


def _run_drain(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request

    from .access import ADMIN_TOKEN_ENV, admin_token

    token = admin_token()
    if token is None:
        raise UsageError(f"{ADMIN_TOKEN_ENV} is not set; drain needs the server's admin token")
    base = args.url.rstrip("/")
    request = urllib.request.Request(
        f"{base}/admin/drain", method="POST", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise UsageError(f"{base}/admin/drain answered {exc.code}: {exc.read().decode(errors='replace')[:200]}") from None
    except OSError as exc:
        raise UsageError(f"--url {args.url}: cannot reach the server ({exc})") from None
    print(f"draining: {answer.get('calls_left')} call(s) left, up to {answer.get('drain_seconds')} s")
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2) as response:
                left = json.loads(response.read()).get("calls_active")
        except OSError:  # refused: the server has exited
            print("the server has exited")
            return 0
        print(f"{left} call(s) left")
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
    if args.wait:
        print(f"the server is still running after {args.wait:g} s", file=sys.stderr)
        return EXIT_PROBLEMS
    return 0


def _add_call(subparsers) -> None:
    p = subparsers.add_parser(
        "call",
        help="run one simulated call from a WAV through the agent's real pipeline, offline",
        description="Play CALLER.wav into the agent as a caller would (in real time, with VAD, end of "
        "turn and barge-in) and write the agent's side of the call, with its timing and silences, to "
        "OUT.wav.",
    )
    p.add_argument("agent", metavar="AGENT.yaml", help="the agent file")
    p.add_argument("--input", required=True, metavar="CALLER.wav",
                   help="what the caller says (WAV, FLAC, OGG or MP3; any rate and channels)")
    p.add_argument("--output", required=True, metavar="OUT.wav", help="where to write the agent's audio (16-bit mono)")
    p.add_argument("--model", default=None, help="override the agent's model: 'tiny', a checkpoint folder or a Hugging Face id")
    p.add_argument("--rate", type=int, default=24000, choices=(8000, 16000, 24000, 48000), help="output sample rate (default: 24000)")
    _add_log_level(p)
    p.set_defaults(run=_run_call)


def _run_call(args: argparse.Namespace) -> int:
    from .simulate import simulate_call

    output = Path(args.output)
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: folder {output.parent} does not exist")
    try:
        caller, caller_rate = read_audio_native(args.input)
    except AudioFileError as exc:
        raise UsageError(f"--input {exc}") from None
    runtime = _runtime(args.agent, args.model)
    print(f"calling agent {runtime.spec.name!r} with {args.input} ({caller.size / caller_rate:.1f} s, real time)")

    async def call_and_close():
        try:
            return await simulate_call(runtime, caller, caller_rate, out_rate=args.rate)
        finally:
            await runtime.close()  # the call's record is written before the process ends

    call, recording, _ = asyncio.run(call_and_close())
    stats = call.stats
    if call.errors:
        for error in call.errors:
            print(f"{PROG} call: error: {error}", file=sys.stderr)
        print(f"{PROG} call: the call with {args.input} failed; {output} not written", file=sys.stderr)
        return EXIT_PROBLEMS
    write_wav(output, recording, args.rate)
    print(stats.summary())
    for i, text in enumerate(stats.texts, 1):
        print(f"turn {i}: {text!r}")
    print(f"wrote {output} ({recording.size / args.rate:.1f} s)")
    return 0


def _add_log_level(p) -> None:
    p.add_argument(
        "--log-level", default=argparse.SUPPRESS, choices=("TRACE", "DEBUG", "INFO", "WARNING", "ERROR"),
        help="log detail, for every library too (default: INFO for the agent, WARNING for the libraries "
        "under it; DEBUG shows every pipeline event)",
    )
    _add_verbose(p)


def _add_verbose(p) -> None:
    # SUPPRESS: a subcommand's default would otherwise overwrite a -v given before the subcommand.
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="show debug logs, the libraries' included (same as --log-level DEBUG)")


def configure_logging(level: str | None = None, verbose: int = 0) -> None:
    """loguru and stdlib logging to stderr: our packages at `level` (INFO), the rest at WARNING unless
    a level is asked for; -v is DEBUG for all."""
    from loguru import logger

    if verbose:
        level = "DEBUG"
    own, others = level or "INFO", level or THIRD_PARTY_LEVEL
    logger.remove()
    logger.add(sys.stderr, level="TRACE", filter={"": others, **dict.fromkeys(OWN_PACKAGES, own)})
    # aiortc, aioice and other stdlib loggers: the root's level gates them; with no handler set,
    # Python's last-resort one prints WARNING and above, so debug needs a handler of its own.
    root = logging.getLogger()
    root.setLevel("DEBUG" if others in ("TRACE", "DEBUG") else others)
    if root.level < logging.WARNING and not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))


def _spec(agent_path: str, model: str | None):
    from .spec import AgentFileError, load_agent

    try:
        return load_agent(agent_path, model=model)
    except AgentFileError as exc:
        raise UsageError(str(exc)) from None
    except FileNotFoundError:
        raise UsageError(f"{agent_path}: no such agent file") from None


def _runtime_for(spec, agent_path: str):
    from processors.chroma.checkpoint import CheckpointError
    from processors.chroma.remote import EngineUnavailable

    from .runtime import AgentRuntime

    try:
        return AgentRuntime(spec)
    except EngineUnavailable as exc:
        raise UsageError(f"{agent_path}: engine: {exc}") from None
    except AudioFileError as exc:
        raise UsageError(f"{agent_path}: voice.audio: {exc}") from None
    except CheckpointError as exc:
        raise UsageError(f"{agent_path}: model: {exc}") from None


def _runtime(agent_path: str, model: str | None):
    return _runtime_for(_spec(agent_path, model), agent_path)


def _check_port(host: str, port: int, kind: int, what: str) -> None:
    """Bind `port` as the server will (TCP with SO_REUSEADDR, as uvicorn does; UDP plain) and let go."""
    try:
        infos = socket.getaddrinfo(host, port, type=kind)
    except socket.gaierror as exc:
        raise UsageError(f"{what}: cannot bind on {host!r}: not an address here ({exc.strerror})") from None
    family, socktype, proto, _, address = infos[0]
    try:
        with socket.socket(family, socktype, proto) as sock:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            if kind == socket.SOCK_STREAM:
                sock.listen()
    except OSError as exc:
        raise UsageError(
            f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}; expected a free port "
            "(is another server running there?)"
        ) from None


# -- flow ------------------------------------------------------------------------------


def _add_flow(subparsers) -> None:
    p = subparsers.add_parser("flow", help="work with flow files (nodes, tools, transitions, actions)")
    actions = p.add_subparsers(dest="flow_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        help="check a flow file as a call would load it; exit 1 and list every problem if any",
        description="Load FLOW.yaml exactly as an agent would before its first call (tools imported, "
        "schemas, transitions, placeholders, actions and keypad settings checked) and print every "
        "problem as file:line: field: message.",
    )
    check.add_argument("flow", metavar="FLOW.yaml", help="the flow file (YAML or JSON)")
    check.add_argument(
        "--handlers",
        metavar="FILE_OR_MODULE",
        help="the handlers module the flow's functions and actions name: a Python file or an importable "
        "module name (default: handlers.py beside the flow file, if there is one)",
    )
    _add_verbose(check)
    check.set_defaults(run=_run_flow_check)


def _run_flow_check(args: argparse.Namespace) -> int:
    import os

    from flows.file import load_flow
    from flows.handlers import resolve_ref
    from flows.problems import FlowFileError

    path = Path(args.flow)
    if not path.is_file():
        raise UsageError(f"{path}: {'is a folder, expected a flow file' if path.is_dir() else 'no such flow file'}")
    handlers = resolve_ref(args.handlers, Path.cwd())
    if isinstance(handlers, Path) and not handlers.is_file():
        raise UsageError(f"--handlers {args.handlers}: no such file")
    try:
        flow = load_flow(args.flow, handlers=handlers)
    except FlowFileError as exc:
        print(exc, file=sys.stderr)
        count = len(exc.problems)
        print(f"{args.flow}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        return EXIT_PROBLEMS
    config = flow.config
    print(
        f"{args.flow}: ok: {len(config.nodes)} nodes, {len(flow.tools)} tools, "
        f"starts at {config.initial_node!r}"
        + (f", handlers from {flow.handlers.where}" if flow.handlers else "")
    )
    for note in flow.notes:
        print(f"note: {note}")
    if flow.extensions:
        print(
            f"pipecat's format with this project's additions ({len(flow.extensions)}), which pipecat's FlowConfig "
            "and Flow alone cannot run:"
        )
        for where in flow.extensions:
            print(f"  {where}")
    else:
        print("pipecat's format: FlowConfig.from_file and Flow load this file as it is")
    # Header values are read from the environment on each call, so a missing one is not an error
    # here (the server may have it), only worth knowing.
    for variable, tools in flow.environment().items():
        if variable not in os.environ:
            print(f"note: ${{{variable}}} is not set here; {', '.join(tools)} will fail until it is")
    return 0


# -- voice -----------------------------------------------------------------------------


def _add_voice(subparsers) -> None:
    from voices.commands import declare

    declare(subparsers, UsageError)


def _add_engine(subparsers) -> None:
    from .engine_command import declare

    declare(subparsers, UsageError)


def _add_test(subparsers) -> None:
    from agent.testing.command import declare

    declare(subparsers, UsageError)


def _add_dial(subparsers) -> None:
    from agent.dial_cli import declare

    declare(subparsers, UsageError)


def _add_calls(subparsers) -> None:
    from agent.calls_cli import declare

    declare(subparsers, UsageError)


# -- shared helpers --------------------------------------------------------------


def _read(path: str, flag: str, rate: int) -> np.ndarray:
    try:
        return read_audio(path, rate)
    except AudioFileError as exc:
        raise UsageError(f"{flag} {exc}") from None


def _consent(given_by: str):
    """The consent record `voice add` keeps, checked the same way (a name, not blank)."""
    import datetime as dt

    from pydantic import ValidationError

    from voices.library import DEFAULT_USE
    from voices.profile import ConsentRecord

    try:
        return ConsentRecord(given_by=given_by, date=dt.date.today(), use=DEFAULT_USE)
    except ValidationError:
        raise UsageError(f"--consent-by is {given_by!r}, expected the name of who consented to this voice "
                         "being cloned") from None


def _device(name: str | None):
    import torch

    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device is {name!r}, expected cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device is {name!r}, expected cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device is {name!r}, but CUDA is not available here; expected cpu")
    return device


def _load(source: str, device):
    from processors.chroma.checkpoint import CheckpointError, load_model

    try:
        return load_model(source, device=device)
    except CheckpointError as exc:
        raise UsageError(f"--model: {exc}") from None


# -- entry point -------------------------------------------------------------------

SUBCOMMANDS: list[Callable] = [
    _add_serve, _add_drain, _add_call, _add_speak, _add_flow, _add_voice, _add_test, _add_calls, _add_dial,
    _add_engine,
]


def package_version() -> str:
    try:
        return version("chroma-agents")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Voice agents on the FlashLabs Chroma speech-to-speech model.")
    parser.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="show debug logs, the libraries' included")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # First, before anything imports pipecat: its banner is logged at import time.
    configure_logging()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help/--version (0) or a malformed command line (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    configure_logging(getattr(args, "log_level", None), args.verbose)
    command = " ".join(filter(None, (args.command, getattr(args, f"{args.command}_command", None))))
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"{PROG} {command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG} {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
