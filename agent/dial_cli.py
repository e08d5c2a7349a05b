"""`chroma-agent dial`: place one call with the agent on it and run it to its end.

    chroma-agent dial AGENT.yaml --to sip:alice@127.0.0.1:5080 --state appointment="Tue 10:00"
    chroma-agent dial AGENT.yaml --to +15551234567 --from +15557654321 --timeout 300

Prints the call's id at once, then how it went: answered, busy, no-answer or failed, and who answered
(a person or a machine). Exit 0 when the call was answered, 1 when it was not (or was refused by a
limit), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio

DEFAULT_TIMEOUT_SECS = 600.0
EXIT_NOT_ANSWERED = 1


def declare(subparsers, usage_error: type[Exception]) -> None:
    p = subparsers.add_parser(
        "dial",
        help="place a call with the agent on it (a SIP URI, or a number over the SIP trunk or Twilio)",
        description="Dial NUMBER_OR_SIP_URI, put the agent on the call once it is answered, and run it to "
        "its end. The callee speaks first; the agent tells a person from an answering machine and does what "
        "the agent file's outbound.on_machine says. Exit 0 answered, 1 not answered or refused, 2 usage.",
    )
    p.add_argument("agent", metavar="AGENT.yaml", help="the agent file")
    p.add_argument(
        "--to",
        required=True,
        metavar="NUMBER_OR_SIP_URI",
        help="sip:user@host[:port] to dial directly, or a phone number (+15551234567)",
    )
    p.add_argument(
        "--from",
        dest="from_",
        default=None,
        metavar="CALLER_ID",
        help="the number or SIP user the call comes from (default: the trunk's caller_id)",
    )
    p.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a value the flow starts with (repeatable), e.g. --state appointment='Tue 10:00'",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECS,
        metavar="S",
        help=f"hang up after this many seconds, ringing included (default: {DEFAULT_TIMEOUT_SECS:.0f})",
    )
    p.add_argument(
        "--model",
        default=None,
        help="override the agent's model: 'tiny', a checkpoint folder or a Hugging Face id",
    )
    from .cli import _add_log_level

    _add_log_level(p)
    p.set_defaults(run=lambda args: _run(args, usage_error))


def _run(args: argparse.Namespace, usage_error: type[Exception]) -> int:
    from .cli import _runtime
    from .outbound import OutboundError, parse_state, route_for

    if not args.timeout > 0:
        raise usage_error(f"--timeout {args.timeout}: expected a number of seconds above 0")
    try:
        state = parse_state(args.state)
    except OutboundError as exc:
        raise usage_error(str(exc)) from None
    runtime = _runtime(args.agent, args.model)
    try:
        route_for(runtime, args.to)
    except OutboundError as exc:
        raise usage_error(str(exc)) from None
    return asyncio.run(dial(runtime, args.to, args.from_, state, args.timeout))


async def dial(runtime, to: str, from_: str | None, state: dict, timeout: float) -> int:
    """Place the call, wait for its end (hanging up at `timeout`), print how it went; the exit code."""
    from .outbound import OutboundError, OutboundRefused, place_call, placed_call

    try:
        call_id = await place_call(runtime, to, from_, state)
    except (OutboundError, OutboundRefused) as exc:
        print(f"not placed: {exc}")
        return EXIT_NOT_ANSWERED
    placed = placed_call(runtime, call_id)
    print(f"call {call_id}: dialling {placed.to} over {placed.route}", flush=True)
    if await placed.wait(timeout) is None:
        placed.note("timeout", after_secs=timeout)
        if placed.call is not None:
            await placed.call.hang_up()
        if await placed.wait(10.0) is None:
            for task in list(runtime.outbound.tasks):
                task.cancel()
            await placed.wait(10.0)
    for at, kind, data in placed.events:
        details = " ".join(f"{key}={value}" for key, value in data.items() if value not in (None, ""))
        print(f"  {at - placed.placed_at:7.2f} s  {kind} {details}".rstrip())
    who = f", {placed.answered_by}" if placed.answered_by else ""
    detail = f" ({placed.detail})" if placed.detail else ""
    print(f"call {call_id}: {placed.outcome}{who}{detail}")
    return 0 if placed.outcome == "answered" else EXIT_NOT_ANSWERED
