"""`chroma-agent test`: run conversation scenarios against an agent and report.

    chroma-agent test examples/scenarios                       # every scenario file in the folder
    chroma-agent test calls.yaml --transport inprocess,sip --runs 5 --report out/

Scenario files are pipecat evals scripted-scenario files, with our additions (see `scenario.py`).

Exit status: 0 when every expectation and limit held, 1 when any failed, 2 for a bad command line or
scenario file (every problem in the file is listed), 3 when none failed but some checks were skipped
(could not be decided: an `eval:` with no judge reachable, or an event the agent has no counterpart
for), so that a run without its judge never reads as a pass.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from .scenario import TRANSPORTS

EXIT_FAILED = 1
EXIT_SKIPPED = 3


def declare(subparsers, usage_error: type[Exception]) -> None:
    p = subparsers.add_parser(
        "test",
        help="run conversation scenarios against an agent: what the caller says and when, what the agent must do",
        description="Play scenario files (pipecat evals scripted scenarios, plus barge-ins, keys and silences; "
        "expectations on replies, judged criteria, latency, barge-in, nodes, tools, DTMF, hang-up, transfer) "
        "against the agent over a transport, and report. Exit 0: all passed; 1: a check failed; 2: bad "
        "command line or file; 3: none failed, some skipped (e.g. no judge reachable).",
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="scenario files, or folders to search")
    p.add_argument("--agent", type=Path, default=None, help="the agent file to call (default: each file's agent:)")
    p.add_argument(
        "--transport", default=None,
        help=f"one or more of {', '.join(TRANSPORTS)}, comma-separated (default: each file's transport:, "
        "else inprocess); latency figures say which",
    )
    p.add_argument("--runs", type=int, default=None, help="runs per scenario (default: each scenario's runs:)")
    p.add_argument("--model", default=None, help="override the agent's model: 'tiny', a folder or a Hugging Face id")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="write report.json, summary.md, junit.xml and a timeline picture per run here")
    p.add_argument("--log-level", default="WARNING", help="log level of the agent's own logs (default: WARNING)")
    p.set_defaults(run=lambda args: run_command(args, usage_error))


def run_command(args: argparse.Namespace, usage_error: type[Exception]) -> int:
    from loguru import logger

    from .expect import evaluate_limits
    from .pipecat_evals import ScenarioFileError, find_scenario_files, load_scenarios
    from .report import progress_line, session_status, summary_table, write_report
    from .runner import ScenarioRunner

    logger.remove()
    logger.add(sys.stderr, level=args.log_level.upper())
    transports = args.transport.split(",") if args.transport else None
    for name in transports or []:
        if name not in TRANSPORTS:
            raise usage_error(f"--transport {name!r}: expected one of {', '.join(TRANSPORTS)}")
    if args.runs is not None and args.runs < 1:
        raise usage_error(f"--runs is {args.runs}, expected at least 1")
    if args.agent is not None and not args.agent.is_file():
        raise usage_error(f"--agent {args.agent}: no such file")
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise usage_error(f"no such file or folder: {', '.join(missing)}")
    files = find_scenario_files(args.paths)
    if not files:
        raise usage_error("no scenario files found (YAML files with a top-level scenarios: list or turns:)")
    loaded = []
    problems = []
    for path in files:
        try:
            loaded.append(load_scenarios(path))
        except ScenarioFileError as exc:
            problems.append(str(exc))
    if problems:
        raise usage_error("scenario files have problems:\n" + "\n".join(problems))

    runner = ScenarioRunner(agent=args.agent, model=args.model)
    results, limits = [], {}

    async def run_all() -> None:
        for file in loaded:
            for scenario in file.scenarios:
                runs = args.runs or scenario.runs
                mine = []
                for transport in transports or [file.transport or "inprocess"]:
                    for n in range(1, runs + 1):
                        result = await runner.run(file, scenario, transport, n)
                        print(progress_line(result, runs), flush=True)
                        mine.append(result)
                results.extend(mine)
                if scenario.limits:
                    limits[scenario.name] = evaluate_limits(scenario, mine)

    asyncio.run(run_all())
    print()
    print(summary_table(results, limits))
    if args.report is not None:
        written = write_report(args.report, results, limits)
        print(f"\nreport: {args.report} ({len(written)} files)")
    status = session_status(results, limits)
    if status == "skip":
        print("\nsome checks were skipped (not decided), so this is not a pass; see Skipped checks above")
    return {"fail": EXIT_FAILED, "skip": EXIT_SKIPPED}.get(status, 0)
