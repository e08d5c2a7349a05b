"""Process-wide counters for /metrics, in Prometheus' text exposition format."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable, Iterable

from loguru import logger

TTFA_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)

# (name, help, value) of one gauge, read when /metrics is rendered
Gauge = tuple[str, str, float]


class ServerMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.calls_active = 0
        self.calls = Counter()  # by transport
        self.turns = 0
        self.turns_failed = 0
        self.barge_ins = 0
        self.dropped_input = Counter()  # by reason
        self.ttfa_counts = [0] * (len(TTFA_BUCKETS) + 1)
        self.ttfa_sum = 0.0
        self.calls_refused = Counter()  # by (transport, reason)
        self.sip_refusals = Counter()  # by reason
        # Gauges owned elsewhere (the runtime's sessions, the SIP server's dialogs, the engine), read at
        # render time so each number has one owner; keyed by owner, so a rebuilt owner replaces its own.
        self._gauges: dict[str, Callable[[], Iterable[Gauge]]] = {}
        self._gauge_failed: set[str] = set()
        self._counters: dict[str, Callable[[], Iterable[Gauge]]] = {}

    def set_gauges(self, owner: str, read: Callable[[], Iterable[Gauge]]) -> None:
        """Render `read()`'s gauges in /metrics from now on, in place of `owner`'s earlier ones."""
        with self._lock:
            self._gauges[owner] = read

    def set_counters(self, owner: str, read: Callable[[], Iterable[Gauge]]) -> None:
        """As set_gauges, for numbers that only grow (rendered as counters)."""
        with self._lock:
            self._counters[owner] = read

    def call_refused(self, transport: str, reason: str) -> None:
        """A new call turned away before it started (busy, not ready)."""
        with self._lock:
            self.calls_refused[(transport, reason)] += 1

    def sip_refused(self, reason: str) -> None:
        """A SIP request refused (400, 403, 486, 488, ...) or a SIP call ended by a timeout."""
        with self._lock:
            self.sip_refusals[reason] += 1

    def call_started(self, transport: str) -> None:
        with self._lock:
            self.calls_active += 1
            self.calls[transport] += 1

    def call_ended(self) -> None:
        with self._lock:
            self.calls_active -= 1

    def turn(self) -> None:
        with self._lock:
            self.turns += 1

    def turn_failed(self) -> None:
        with self._lock:
            self.turns_failed += 1

    def barge_in(self) -> None:
        with self._lock:
            self.barge_ins += 1

    def dropped(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.dropped_input[reason] += n

    def first_audio(self, seconds: float) -> None:
        with self._lock:
            self.ttfa_counts[bisect.bisect_left(TTFA_BUCKETS, seconds)] += 1
            self.ttfa_sum += seconds

    def render(self) -> str:
        with self._lock:
            out = [
                "# HELP chroma_agents_calls_active Calls in progress.",
                "# TYPE chroma_agents_calls_active gauge",
                f"chroma_agents_calls_active {self.calls_active}",
                "# HELP chroma_agents_calls_total Calls started, by transport.",
                "# TYPE chroma_agents_calls_total counter",
                *(f'chroma_agents_calls_total{{transport="{t}"}} {n}' for t, n in sorted(self.calls.items())),
                "# HELP chroma_agents_turns_total Agent replies started.",
                "# TYPE chroma_agents_turns_total counter",
                f"chroma_agents_turns_total {self.turns}",
                "# HELP chroma_agents_turns_failed_total Agent replies the model failed on (the apology played instead).",
                "# TYPE chroma_agents_turns_failed_total counter",
                f"chroma_agents_turns_failed_total {self.turns_failed}",
                "# HELP chroma_agents_barge_ins_total Agent replies cut by the caller speaking.",
                "# TYPE chroma_agents_barge_ins_total counter",
                f"chroma_agents_barge_ins_total {self.barge_ins}",
                "# HELP chroma_agents_dropped_input_total Caller input dropped, by reason.",
                "# TYPE chroma_agents_dropped_input_total counter",
                *(
                    f'chroma_agents_dropped_input_total{{reason="{r}"}} {n}'
                    for r, n in sorted(self.dropped_input.items())
                ),
                "# HELP chroma_agents_time_to_first_audio_seconds End of the caller's turn to the agent's first audio.",
                "# TYPE chroma_agents_time_to_first_audio_seconds histogram",
            ]
            cumulative = 0
            for bound, n in zip(TTFA_BUCKETS, self.ttfa_counts, strict=False):
                cumulative += n
                out.append(f'chroma_agents_time_to_first_audio_seconds_bucket{{le="{bound}"}} {cumulative}')
            cumulative += self.ttfa_counts[-1]
            out += [
                f'chroma_agents_time_to_first_audio_seconds_bucket{{le="+Inf"}} {cumulative}',
                f"chroma_agents_time_to_first_audio_seconds_sum {self.ttfa_sum:.6f}",
                f"chroma_agents_time_to_first_audio_seconds_count {cumulative}",
                "# HELP chroma_agents_calls_refused_total New calls turned away, by transport and reason.",
                "# TYPE chroma_agents_calls_refused_total counter",
                *(
                    f'chroma_agents_calls_refused_total{{transport="{t}",reason="{r}"}} {n}'
                    for (t, r), n in sorted(self.calls_refused.items())
                ),
                "# HELP chroma_sip_refusals_total SIP requests refused and SIP calls ended by a timeout, by reason.",
                "# TYPE chroma_sip_refusals_total counter",
                *(f'chroma_sip_refusals_total{{reason="{r}"}} {n}' for r, n in sorted(self.sip_refusals.items())),
            ]
            sources = [(owner, read, "gauge") for owner, read in self._gauges.items()]
            sources += [(owner, read, "counter") for owner, read in self._counters.items()]
        for owner, read, kind in sources:  # outside the lock: the owners' own state is read here
            try:
                gauges = list(read())
            except Exception:
                if owner not in self._gauge_failed:
                    self._gauge_failed.add(owner)
                    logger.exception(f"metrics: the {owner} gauges could not be read (logged once)")
                continue
            for name, help_text, value in gauges:
                out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {float(value):g}"]
        return "\n".join(out) + "\n"
