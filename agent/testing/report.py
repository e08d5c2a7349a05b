"""Reports of a test session: report.json, summary.md, junit.xml, one timeline PNG per run, and the
text the CLI prints while it runs (one progress line per run, then the summary table).

Latency columns are nearest-rank percentiles (`expect.percentile`) over every measurement of every
run of a scenario on one transport. A skipped check (one that could not be decided: no judge could be
reached, or an event the agent has no counterpart for) is never counted as passed: a run with one and
no failure is SKIP, listed with the reason under "Skipped checks", `<skipped>` in JUnit.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .events import Check, Event, RunResult, first_audio_after, stopped_after, turn_anchor
from .expect import percentile

_Group = tuple[str, str, str]  # file, scenario, transport


def write_report(
    folder: Path, results: list[RunResult], limit_checks: dict[str, list[Check]] | None = None
) -> dict[str, Path]:
    """Writes every report into `folder` (created if needed); `limit_checks` are by scenario name.
    Returns the paths written: "json", "markdown", "junit", and "timeline:<png name>" per run."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    limit_checks = limit_checks or {}
    paths = {"json": folder / "report.json", "markdown": folder / "summary.md", "junit": folder / "junit.xml"}
    paths["json"].write_text(json.dumps(report_dict(results, limit_checks), indent=2, default=str) + "\n")
    paths["markdown"].write_text(summary_table(results, limit_checks))
    paths["junit"].write_bytes(junit_xml(results, limit_checks))
    used: set[str] = set()
    for result in results:
        name = _timeline_name(result, used)
        paths[f"timeline:{name}"] = write_timeline(folder / name, result)
    return paths


def report_dict(results: list[RunResult], limit_checks: dict[str, list[Check]]) -> dict[str, Any]:
    """What report.json holds: a summary per scenario and transport, every run, every limit check."""
    summary = []
    for (file, scenario, transport), runs in _groups(results).items():
        limits = limit_checks.get(scenario, [])
        row = {
            "file": file,
            "scenario": scenario,
            "transport": transport,
            "runs": len(runs),
            "runs_passed": sum(r.passed for r in runs),
            "runs_skipped": sum(r.status == "skip" for r in runs),
            "limits_passed": all(c.passed for c in limits),
        }
        for key, values in _measured(runs).items():
            row[key] = {"p50": _pct(values, 50), "p95": _pct(values, 95), "n": len(values)}
        summary.append(row)
    every_limit = [c for checks in limit_checks.values() for c in checks]
    return {
        "passed": all(r.passed for r in results) and all(c.passed for c in every_limit),
        "status": session_status(results, limit_checks),
        "summary": summary,
        "runs": [{**r.to_dict(), "record_id": record_of(r)} for r in results],
        "limits": {scenario: [c.to_dict() for c in checks] for scenario, checks in limit_checks.items()},
    }


def session_status(results: list[RunResult], limit_checks: dict[str, list[Check]] | None = None) -> str:
    """"fail" when a run or a limit failed, else "skip" when a check was skipped, else "pass"."""
    limits = [c for checks in (limit_checks or {}).values() for c in checks]
    if any(r.status == "fail" for r in results) or any(c.failed for c in limits):
        return "fail"
    return "skip" if any(r.status == "skip" for r in results) else "pass"


def record_of(result: RunResult) -> str | None:
    """The id of the run's call record (`chroma-agent calls show ID`), when records were kept."""
    return getattr(result, "record_id", None)


def progress_line(result: RunResult, runs: int | None = None) -> str:
    """One line per finished run: `PASS  order status  run 2/5  twilio  first audio p50 612 ms  0 failed`
    (and `, 2 skipped` when checks could not be decided; such a run without failures is SKIP)."""
    first_audio = result.measurements()["first_audio_ms"]
    p50 = f"{percentile(first_audio, 50):.0f} ms" if first_audio else "-"
    failed = sum(c.failed for c in result.checks) + (result.error is not None)
    skipped = sum(c.skipped for c in result.checks)
    total = f"/{runs}" if runs else ""
    line = (
        f"{result.status.upper()}  {result.scenario}  run {result.run}{total}  "
        f"{result.transport}  first audio p50 {p50}  {failed} failed"
    )
    line += f", {skipped} skipped" if skipped else ""
    if record_of(result):
        line += f"  record {record_of(result)}"
    return line + (f"  (error: {_one_line(result.error)})" if result.error else "")


def summary_table(results: list[RunResult], limit_checks: dict[str, list[Check]] | None = None) -> str:
    """The Markdown table of summary.md, then every failed check and run error with its detail."""
    limit_checks = limit_checks or {}
    rows = [
        "| scenario | transport | runs passed | first audio p50 / p95 ms | barge-in stop p50 / p95 ms | limits |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (_file, scenario, transport), runs in _groups(results).items():
        measured = _measured(runs)
        limits = limit_checks.get(scenario, [])
        limit_cell = "-" if not limits else f"{sum(c.passed for c in limits)}/{len(limits)} met"
        skipped = sum(r.status == "skip" for r in runs)
        runs_cell = f"{sum(r.passed for r in runs)}/{len(runs)}" + (f" ({skipped} skipped)" if skipped else "")
        rows.append(
            f"| {_cell(scenario)} | {transport} | {runs_cell} | "
            f"{_pair(measured['first_audio_ms'])} | {_pair(measured['barge_in_stop_ms'])} | {limit_cell} |"
        )
    failures, skips = [], []
    for r in results:
        where = f"{r.scenario} [run {r.run}] ({r.transport})" + (f" record {record_of(r)}" if record_of(r) else "")
        if r.error:
            failures.append(f"- **{where}**: the run did not complete: {_one_line(r.error)}")
        for c in r.checks:
            if c.failed:
                failures.append(f"- **{where}** {c.name}: {c.detail}{_at(r.file, c.line)}")
            elif c.skipped:
                skips.append(f"- **{where}** {c.name}: {c.detail}{_at(r.file, c.line)}")
    for scenario, checks in limit_checks.items():
        file = next((r.file for r in results if r.scenario == scenario), "")
        failures += [
            f"- **{scenario}** limit {c.name}: {c.detail}{_at(file, c.line)}" for c in checks if not c.passed
        ]
    text = "\n".join(rows) + "\n"
    if failures:
        text += "\n### Failed checks\n\n" + "\n".join(failures) + "\n"
    if skips:
        text += "\n### Skipped checks (not decided: neither passed nor failed)\n\n" + "\n".join(skips) + "\n"
    return text


def junit_xml(results: list[RunResult], limit_checks: dict[str, list[Check]] | None = None) -> bytes:
    """JUnit XML: a testsuite per scenario file, a testcase per run (`<scenario> [run N] (<transport>)`)
    with a <failure> per failed check, and a testcase per limit check."""
    limit_checks = limit_checks or {}
    suites = ET.Element("testsuites", name="chroma-agent test")
    by_file: dict[str, list[RunResult]] = {}
    for r in results:
        by_file.setdefault(r.file, []).append(r)
    for scenario in limit_checks:  # limits of a scenario with no run still get a suite
        if not any(r.scenario == scenario for r in results):
            by_file.setdefault("", [])
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for file, runs in by_file.items():
        suite = ET.SubElement(suites, "testsuite", name=file or "limits")
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        seconds = 0.0
        for r in runs:
            case = ET.SubElement(
                suite,
                "testcase",
                name=f"{r.scenario} [run {r.run}] ({r.transport})",
                classname=_classname(file, r.scenario),
                time=f"{r.duration_ms / 1000:.3f}",
            )
            seconds += r.duration_ms / 1000
            counts["tests"] += 1
            failed = [c for c in r.checks if c.failed]
            skipped = [c for c in r.checks if c.skipped]
            for c in failed:
                failure = ET.SubElement(case, "failure", message=f"{c.name}: {c.detail}", type="expectation")
                failure.text = f"{c.name}\n{c.detail}{_at(file, c.line)}"
            if r.error:
                error = ET.SubElement(case, "error", message=_one_line(r.error), type="run")
                error.text = r.error
                counts["errors"] += 1
            elif failed:
                counts["failures"] += 1
            elif skipped:
                note = ET.SubElement(
                    case, "skipped", message="; ".join(f"{c.name}: {c.detail}" for c in skipped)
                )
                note.text = "\n".join(f"{c.name}\n{c.detail}{_at(file, c.line)}" for c in skipped)
                counts["skipped"] += 1
        scenarios = list(dict.fromkeys(r.scenario for r in runs))
        if not file:
            scenarios = [s for s in limit_checks if not any(r.scenario == s for r in results)]
        for scenario in scenarios:
            for c in limit_checks.get(scenario, []):
                case = ET.SubElement(
                    suite,
                    "testcase",
                    name=f"{scenario} limit: {c.name}",
                    classname=_classname(file, scenario),
                )
                counts["tests"] += 1
                if not c.passed:
                    failure = ET.SubElement(case, "failure", message=f"{c.name}: {c.detail}", type="limit")
                    failure.text = f"{c.name}\n{c.detail}{_at(file, c.line)}"
                    counts["failures"] += 1
        suite.set("time", f"{seconds:.3f}")
        for key, value in counts.items():
            suite.set(key, str(value))
            totals[key] += value
    for key, value in totals.items():
        suites.set(key, str(value))
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


# the timeline picture

_LANES = {"caller": 3.0, "agent": 2.0, "vad": 1.0, "events": 0.0}
_MARKERS = {  # kind -> (colour, marker, label of the data)
    "tool_call": ("tab:purple", "s", "name"),
    "node": ("tab:green", "D", "name"),
    "caller_dtmf": ("tab:blue", "v", "digits"),
    "dtmf_sent": ("tab:orange", "^", "digits"),
    "call_ended": ("black", "X", "by"),
    "transferred": ("tab:brown", "P", "to"),
    "error": ("tab:red", "x", "message"),
}
_LABEL_ROWS = (0.2, -0.42, 0.48, -0.7, -0.98)  # offsets of marker labels from the events lane


def write_timeline(path: Path, result: RunResult) -> Path:
    """A picture of one run: caller speech, agent speech and VAD as bars on one time axis (seconds),
    markers for barge-ins, tool calls, nodes, DTMF and the call's end, and each latency measured."""
    import matplotlib

    matplotlib.use("Agg")  # here, not at import: the CLI must not change the backend of whoever imports us
    import matplotlib.pyplot as plt

    events = sorted(result.events, key=lambda e: e.t_ms)
    end_s = max([e.t_ms for e in events] + [result.duration_ms, 1.0]) / 1000
    fig, ax = plt.subplots(figsize=(12, 5))
    try:
        _draw_spans(ax, events, end_s)
        _draw_markers(ax, events, end_s)
        _draw_latencies(ax, events)
        verdict = result.status.upper()
        ax.set_title(
            f"{result.scenario}, run {result.run}, {result.transport}: {verdict} "
            f"(latency measured at the {result.transport} wire)",
            fontsize=11,
        )
        ax.set_xlim(-0.02 * end_s, end_s * 1.04)
        ax.set_ylim(-1.15, 3.7)
        ax.set_yticks(list(_LANES.values()), ["caller", "agent", "agent VAD", "events"])
        ax.set_xlabel("seconds since the call started")
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def _draw_spans(ax: Any, events: list[Event], end_s: float) -> None:
    caller_open: Event | None = None
    agent_open: Event | None = None
    vad_open: Event | None = None
    for e in events:
        if e.kind == "caller_speech_start":
            caller_open = e
        elif e.kind == "caller_speech_end" and caller_open is not None:
            silence = bool(caller_open.data.get("silence"))
            label = (
                "(silence)"
                if silence
                else _short(caller_open.data.get("text") or caller_open.data.get("wav"))
            )
            _bar(ax, "caller", caller_open.t_ms, e.t_ms, "lightgray" if silence else "tab:blue", label)
            caller_open = None
        elif e.kind == "agent_audio_start":
            agent_open = agent_open or e
        elif e.kind in ("agent_audio_end", "agent_stopped") and agent_open is not None:
            _bar(ax, "agent", agent_open.t_ms, e.t_ms, "tab:orange", "")
            agent_open = None
        elif e.kind == "vad_start":
            vad_open = vad_open or e
        elif e.kind == "vad_stop" and vad_open is not None:
            _bar(ax, "vad", vad_open.t_ms, e.t_ms, "tab:gray", "")
            vad_open = None
    for lane, still_open in (("caller", caller_open), ("agent", agent_open), ("vad", vad_open)):
        if still_open is not None:  # never ended: draw it to the end of the recording, hatched
            _bar(ax, lane, still_open.t_ms, end_s * 1000, "none", "", hatch="//")


def _bar(
    ax: Any, lane: str, start_ms: float, end_ms: float, colour: str, label: str, hatch: str = ""
) -> None:
    y = _LANES[lane]
    width = max(end_ms - start_ms, 1.0) / 1000
    ax.barh(
        y, width, left=start_ms / 1000, height=0.5, color=colour, alpha=0.75, edgecolor="black", hatch=hatch
    )
    if label:
        ax.text(start_ms / 1000, y + 0.3, label, fontsize=7, va="bottom", ha="left", clip_on=True)


def _draw_markers(ax: Any, events: list[Event], end_s: float) -> None:
    per_char_s = end_s * 1.06 / 1000 * 4.6  # about 4.6 px per 7 pt character on a ~1000 px wide axis
    row_free = [float("-inf")] * len(_LABEL_ROWS)  # where each label row is free again, in seconds
    for e in events:
        t = e.t_ms / 1000
        if e.kind == "barge_in":
            ax.axvline(t, color="tab:red", linestyle="--", linewidth=1)
            ax.text(t, 3.55, "barge-in", color="tab:red", fontsize=7, ha="center")
        elif e.kind in _MARKERS:
            colour, marker, key = _MARKERS[e.kind]
            ax.plot([t], [_LANES["events"]], marker=marker, color=colour, markersize=8, linestyle="none")
            label = e.kind.replace("_", " ")
            if e.data.get(key):
                label = f"{label}: {_short(e.data.get(key), 24)}"
            # events often come close together: put each label on the first row it does not overlap
            half = len(label) * per_char_s / 2
            row = next((i for i, free in enumerate(row_free) if free <= t - half), len(row_free) - 1)
            row_free[row] = t + half + per_char_s
            ax.text(t, _LANES["events"] + _LABEL_ROWS[row], label, fontsize=7, color=colour, ha="center")


def _draw_latencies(ax: Any, events: list[Event]) -> None:
    y_mid = (_LANES["caller"] + _LANES["agent"]) / 2
    for turn in sorted({e.turn for e in events if e.turn is not None}):
        anchor = turn_anchor(events, turn)
        audio = first_audio_after(events, turn, anchor) if anchor is not None else None
        if audio is not None:
            _arrow(ax, anchor, audio.t_ms, y_mid, "tab:blue")
    for barge_in in (e for e in events if e.kind == "barge_in"):
        stopped = stopped_after(events, barge_in.t_ms)
        if stopped is not None:
            _arrow(ax, barge_in.t_ms, stopped.t_ms, _LANES["agent"] - 0.45, "tab:red")


def _arrow(ax: Any, start_ms: float, end_ms: float, y: float, colour: str) -> None:
    ax.annotate(
        "",
        xy=(end_ms / 1000, y),
        xytext=(start_ms / 1000, y),
        arrowprops={"arrowstyle": "|-|,widthA=0.3,widthB=0.3", "color": colour, "linewidth": 1.2},
    )
    ax.text(
        (start_ms + end_ms) / 2000,
        y + 0.06,
        f"{end_ms - start_ms:.0f} ms",
        fontsize=7,
        color=colour,
        ha="center",
    )


# helpers


def _groups(results: list[RunResult]) -> dict[_Group, list[RunResult]]:
    groups: dict[_Group, list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.file, r.scenario, r.transport), []).append(r)
    return groups


def _measured(runs: list[RunResult]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"first_audio_ms": [], "barge_in_stop_ms": []}
    for r in runs:
        for key, values in r.measurements().items():
            out.setdefault(key, []).extend(values)
    return out


def _pct(values: list[float], p: float) -> float | None:
    return percentile(values, p) if values else None


def _pair(values: list[float]) -> str:
    return f"{percentile(values, 50):.0f} / {percentile(values, 95):.0f}" if values else "-"


def _timeline_name(result: RunResult, used: set[str]) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", result.scenario.lower()).strip("-") or "scenario"
    for candidate in (slug, f"{slug}-{result.transport}"):
        if f"timeline-{candidate}-run{result.run}.png" not in used:
            break
    n = 2
    while f"timeline-{candidate}-run{result.run}.png" in used:  # same scenario name in two files
        candidate, n = f"{slug}-{result.transport}-{n}", n + 1
    name = f"timeline-{candidate}-run{result.run}.png"
    used.add(name)
    return name


def _classname(file: str, scenario: str) -> str:
    return f"{Path(file).stem or 'scenarios'}.{scenario}"


def _at(file: str, line: int | None) -> str:
    return f" ({file}:{line})" if line else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _one_line(text: str | None) -> str:
    return " ".join(str(text or "").split())[:200]


def _short(value: Any, limit: int = 40) -> str:
    text = " ".join(str(value or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
