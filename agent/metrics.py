"""Process-wide counters for /metrics, in Prometheus' text exposition format."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

TTFA_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


class ServerMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.calls_active = 0
        self.calls = Counter()  # by transport
        self.turns = 0
        self.barge_ins = 0
        self.dropped_input = Counter()  # by reason
        self.ttfa_counts = [0] * (len(TTFA_BUCKETS) + 1)
        self.ttfa_sum = 0.0

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
            ]
        return "\n".join(out) + "\n"
