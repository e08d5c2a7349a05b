"""`chroma-agent engine`: the model and its batched scheduler as a service for call servers.

    chroma-agent engine --model FlashLabs/Chroma-4B --device cuda --port 7400 --max-sessions 64
    # agent.yaml of each call server:   engine: grpc://ENGINE-HOST:7400

Runs until SIGTERM or Ctrl-C; then open sessions get a moment to finish and their calls say goodbye.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

DEFAULT_PORT = 7400


def tiny_engine_command(port: int, max_sessions: int, *extra: str) -> list[str]:
    """The command line of `chroma-agent engine` on the tiny model and the CPU, on loopback `port`: the
    engine the tests and benchmarks start in a process of its own."""
    return [
        sys.executable, "-m", "agent.cli", "engine", "--model", "tiny", "--device", "cpu",
        "--port", str(port), "--max-sessions", str(max_sessions), *extra,
    ]  # fmt: skip


def declare(subparsers, usage_error: type[Exception]) -> None:
    p = subparsers.add_parser(
        "engine",
        help="serve the model to call servers over gRPC (agent files then say engine: grpc://HOST:PORT)",
        description="Load the model once and serve engine sessions over gRPC: every call of every call "
        "server whose agent file says `engine: grpc://HOST:PORT` is batched in this process's scheduler.",
    )
    p.add_argument("--model", required=True, help="'tiny', a checkpoint folder or a Hugging Face id")
    p.add_argument(
        "--device", default=None, metavar="cpu|cuda", help="device (default: cuda if available, else cpu)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default: {DEFAULT_PORT})"
    )
    p.add_argument(
        "--max-sessions",
        type=int,
        default=64,
        metavar="N",
        help="calls served at once, all call servers together; more are refused (default: 64)",
    )
    p.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=("TRACE", "DEBUG", "INFO", "WARNING", "ERROR"),
        help="log detail (default: INFO)",
    )
    p.set_defaults(run=lambda args: _run(args, usage_error))


def _run(args: argparse.Namespace, usage_error: type[Exception]) -> int:
    from .cli import _check_port, _device, _load

    if not 0 < args.port < 65536:
        raise usage_error(f"--port is {args.port}, expected 1 to 65535")
    if args.max_sessions < 1:
        raise usage_error(f"--max-sessions is {args.max_sessions}, expected at least 1")
    # Before the model loads (minutes for real weights): a port in use fails now, not after.
    _check_port(args.host, args.port, socket.SOCK_STREAM, f"--port {args.port} (gRPC)")
    device = _device(args.device)
    model = _load(args.model, device)
    print(f"engine: model {model.source} on {model.device}, at most {args.max_sessions} sessions")
    if model.config.is_tiny:
        print("note: 'tiny' is a random miniature for tests; it produces noise, not speech")
    asyncio.run(_serve(model, args))
    return 0


async def _serve(model, args: argparse.Namespace) -> None:
    from processors.chroma.engine_server import EngineServer

    server = EngineServer(model, max_sessions=args.max_sessions)
    port = await server.start(args.host, args.port)
    print(
        f"serving grpc://{args.host}:{port} (put `engine: grpc://{args.host}:{port}` in the agent files)",
        flush=True,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    print("engine: stopping; open sessions end", flush=True)
    await server.stop(2.0)
