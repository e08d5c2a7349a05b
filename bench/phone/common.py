"""What the phone benchmark's parts share: the server subprocess, CPU readings, ports, gap statistics."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from ..pipeline.common import ROOT, log

GAP_LIMIT_SECS = 0.040  # the target: no output gap over 40 ms
LOUD_RMS = 1000  # int16 RMS of a 20 ms frame that carries the reply (the stand-in's tone is ~6900)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PhoneServer:
    """`python -m bench.phone server` as a subprocess: Twilio on an HTTP port, SIP on a UDP port."""

    def __init__(self, folder: Path, *, reply_secs: float, max_calls: int = 120):
        self.port = free_port()
        self.sip_port = free_port(socket.SOCK_DGRAM)
        self.log_path = folder / "server.log"
        self.command = [
            sys.executable, "-m", "bench.phone", "server", "--port", str(self.port), "--sip-port", str(self.sip_port),
            "--reply-secs", str(reply_secs), "--max-calls", str(max_calls),
        ]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> PhoneServer:
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(self.command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"phone server exited ({self.proc.returncode}); see {self.log_path}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                    json.loads(r.read())
                    return self
            time.sleep(0.3)
        raise RuntimeError(f"phone server not ready after 90 s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def calls_active(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as r:
            return json.loads(r.read())["calls_active"]

    def wait_idle(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if self.calls_active() == 0:
                    return True
            time.sleep(0.5)
        log(f"phone server still has calls after {timeout:.0f} s")
        return False


def frame_rms(pcm: np.ndarray, frame: int = 160) -> np.ndarray:
    n = pcm.size // frame
    return np.sqrt((pcm[: n * frame].astype(np.float64).reshape(n, frame) ** 2).mean(axis=1))
