"""Call servers with Kamailio and HAProxy in front, on loopback: for the front-door tests and benchmark.

    servers = [CallServer(folder / f"s{i}", agent_yaml) for i in range(3)]   # `chroma-agent serve` each
    kamailio = Kamailio(folder / "kamailio", [s.sip_port for s in servers], probe_seconds=1)
    haproxy = HAProxy(folder / "haproxy", [s.port for s in servers])

Kamailio runs deploy/kamailio.cfg itself, its settings given as preprocessor defines, with a dispatcher
list naming the servers; HAProxy runs deploy/haproxy.cfg with its server lines and check interval
replaced. Every process has its own folder (logs, runtime files), a start-up deadline and `stop()`,
which ends it and waits (bounded); a process that will not stop is killed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KAMAILIO = shutil.which("kamailio") or ("/usr/sbin/kamailio" if Path("/usr/sbin/kamailio").exists() else None)
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
HOST = "127.0.0.1"
STOP_SECS = 15.0


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_port_range(count: int) -> int:
    """The first of `count` consecutive free UDP ports (even), for a server's RTP."""
    for _ in range(200):
        first = (free_port(socket.SOCK_DGRAM) & ~1) % 50000 + 10000
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(s)
                s.bind((HOST, port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free UDP ports on {HOST}")


def sip_options(port: int, timeout: float = 2.0) -> int | None:
    """Send one SIP OPTIONS to HOST:port; the response's status, or None when none came."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        s.settimeout(timeout)
        local = s.getsockname()[1]
        call_id = uuid.uuid4().hex
        request = (
            f"OPTIONS sip:{HOST}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{local};branch=z9hG4bK{call_id[:16]};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:probe@{HOST}>;tag={call_id[:8]}\r\nTo: <sip:{HOST}:{port}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        )
        s.sendto(request.encode(), (HOST, port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except (TimeoutError, OSError):
                return None
            m = re.match(rb"SIP/2.0 (\d{3})", data)
            if m and int(m.group(1)) >= 200:
                return int(m.group(1))
        return None


class _Process:
    """A subprocess with its output in `folder/name.log`."""

    name = "process"

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    def _start(self, command: list[str], env: dict | None = None) -> None:
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command, cwd=self.folder, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def _check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"{self.name} exited ({code}); its log:\n{self.log()[-3000:]}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if still running after `timeout`."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with _suppress():
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: children (Kamailio's) too
            if self.wait(STOP_SECS) is None:
                with _suppress():
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.wait(STOP_SECS)
        self._log.close()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, ProcessLookupError | PermissionError)


class CallServer(_Process):
    """`chroma-agent serve` on an agent file made from `agent_yaml` (a format string that may use
    {sip_port}, {rtp_first}, {rtp_last} and {port}); SIP on its own UDP port."""

    name = "call-server"

    def __init__(
        self,
        folder: Path,
        agent_yaml: str,
        *,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        rtp_ports: int = 80,
    ):
        super().__init__(folder)
        self.port = free_port()
        self.sip_port = free_port(socket.SOCK_DGRAM)
        self.rtp_first = free_port_range(rtp_ports)
        self.agent_path = folder / "agent.yaml"
        self.agent_path.write_text(
            agent_yaml.format(
                port=self.port, sip_port=self.sip_port, rtp_first=self.rtp_first,
                rtp_last=self.rtp_first + rtp_ports - 1,
            )
        )  # fmt: skip
        self.command = command or [
            sys.executable, "-m", "agent.cli", "serve", str(self.agent_path), "--port", str(self.port),
        ]  # fmt: skip
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> CallServer:
        self._start(self.command, self.env)
        return self

    def wait_ready(self, timeout: float = 180.0) -> CallServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            status, _ = self.readyz()
            if status == 200:
                return self
            time.sleep(0.3)
        raise RuntimeError(f"call server on {self.port} not ready after {timeout:.0f} s:\n{self.log()[-3000:]}")

    def get(self, path: str, timeout: float = 5.0) -> tuple[int | None, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except OSError:
            return None, ""

    def readyz(self) -> tuple[int | None, dict]:
        status, body = self.get("/readyz", timeout=2.0)
        try:
            return status, json.loads(body) if body else {}
        except ValueError:
            return status, {}

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of /metrics (0 when absent), e.g. metric("chroma_agents_calls_total", 'transport="sip"')."""
        _, text = self.get("/metrics")
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def calls(self, transport: str) -> int:
        return int(self.metric("chroma_agents_calls_total", f'transport="{transport}"'))

    def calls_active(self) -> int:
        return int(self.metric("chroma_agents_calls_active"))


class Kamailio(_Process):
    """deploy/kamailio.cfg on HOST:port, dispatching to the given SIP ports."""

    name = "kamailio"

    def __init__(self, folder: Path, sip_ports: list[int], *, probe_seconds: int = 1, first_reply_ms: int = 1500):
        super().__init__(folder)
        if KAMAILIO is None:
            raise RuntimeError("kamailio is not installed (apt-get install kamailio)")
        self.port = free_port(socket.SOCK_DGRAM)
        self.dispatcher_list = folder / "dispatcher.list"
        self.dispatcher_list.write_text(
            "".join(f"1 sip:{HOST}:{port} 0 0 name=server-{i}\n" for i, port in enumerate(sip_ports))
        )
        # One UDP worker: with several, a 180 and the 200 after it may leave in either order (legal SIP, but
        # SIPp aborts a call on a 180 that comes late), and the tests count calls, not reorderings.
        self.command = [
            KAMAILIO, "-f", str(DEPLOY / "kamailio.cfg"), "-DD", "-E", "-m", "64", "-M", "8",
            "-Y", str(folder), "-P", str(folder / "kamailio.pid"), "-w", str(folder),
            "-A", f"SIP_LISTEN=udp:{HOST}:{self.port}", "-A", f'DISPATCHER_LIST="{self.dispatcher_list}"',
            "-A", f"PROBE_SECONDS={probe_seconds}", "-A", f"FIRST_REPLY_MS={first_reply_ms}", "-A", "WORKERS=1",
        ]  # fmt: skip

    def start(self, timeout: float = 20.0) -> Kamailio:
        self._start(self.command)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if sip_options(self.port, timeout=0.5) == 200:
                return self
        raise RuntimeError(f"kamailio not answering OPTIONS on {self.port} after {timeout:.0f} s:\n{self.log()[-3000:]}")


class HAProxy(_Process):
    """deploy/haproxy.cfg on HOST:port in front of the given HTTP ports, checking /readyz every `check_ms`."""

    name = "haproxy"

    def __init__(self, folder: Path, http_ports: list[int], *, check_ms: int = 500, port: int | None = None):
        super().__init__(folder)
        if HAPROXY is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        self.port = port or free_port()
        config = DEPLOY.joinpath("haproxy.cfg").read_text()
        servers = "".join(f"\tserver server-{i} {HOST}:{port}\n" for i, port in enumerate(http_ports))
        config, count = re.subn(r"(?m)^\tserver call-\d+ .*\n", "", config)
        if count == 0:
            raise RuntimeError("deploy/haproxy.cfg: expected its 'server call-N ...' lines to replace")
        config = config.rstrip("\n") + "\n" + servers
        config = re.sub(r"inter \S+ fall \d+ rise \d+", f"inter {check_ms}ms fall 1 rise 1", config)
        self.config_path = folder / "haproxy.cfg"
        self.config_path.write_text(config)
        self.command = [HAPROXY, "-f", str(self.config_path), "-db"]
        self.env = {**os.environ, "HAPROXY_BIND": f"{HOST}:{self.port}"}

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 20.0) -> HAProxy:
        self._start(self.command, self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"haproxy not passing requests on {self.port} after {timeout:.0f} s:\n{self.log()[-3000:]}")


SIPP = shutil.which("sipp")
SIPP_CALL = ROOT / "tests" / "transports" / "sip" / "scenarios" / "uac_call.xml"  # INVITE, ACK, hold, BYE


class SippRun:
    """SIPp placing `calls` calls (uac_call.xml: Record-Route honoured) to HOST:port, `rate` a second, each
    held `hold_ms`. `start()`, then `finish()` for the counts: successful and failed calls, and each
    call's INVITE → 200 OK time in ms."""

    def __init__(self, folder: Path, port: int, *, calls: int, rate: float = 10, hold_ms: int = 500, timeout: float = 60):
        if SIPP is None:
            raise RuntimeError("sipp is not installed (apt-get install sip-tester)")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.command = [
            SIPP, f"{HOST}:{port}", "-sf", str(SIPP_CALL), "-s", "agent", "-i", HOST,
            "-p", str(free_port(socket.SOCK_DGRAM)), "-mp", str(free_port_range(4)),
            "-m", str(calls), "-l", str(calls), "-r", str(rate), "-d", str(hold_ms), "-nostdin",
            "-timeout", f"{int(timeout)}s", "-timeout_error", "-trace_err", "-trace_stat", "-fd", "1",
            "-trace_rtt", "-rtt_freq", "1",
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.successful = self.failed = 0
        self.invite_ok_ms: list[float] = []

    def start(self) -> SippRun:
        self._log = open(self.folder / "sipp.log", "w")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(self.command, cwd=self.folder, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def finish(self) -> SippRun:
        try:
            self.returncode = self.proc.wait(timeout=self.timeout + 20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait(timeout=10)
        finally:
            self._log.close()
        stats = sorted(self.folder.glob("*_[0-9]*_.csv"))
        if stats:
            lines = [line.split(";") for line in stats[-1].read_text().splitlines() if line.strip()]
            row = dict(zip(lines[0], lines[-1], strict=False))
            self.successful = int(row.get("SuccessfulCall(C)", 0))
            self.failed = int(row.get("FailedCall(C)", 0))
        for path in self.folder.glob("*_rtt.csv"):
            for line in path.read_text().splitlines()[1:]:
                fields = line.split(";")
                if len(fields) >= 2:
                    try:
                        self.invite_ok_ms.append(float(fields[1]))
                    except ValueError:
                        pass
        return self

    def errors(self) -> str:
        text = (self.folder / "sipp.log").read_text(errors="replace")[-2000:]
        for path in self.folder.glob("*_errors.log"):
            text += "\n" + path.read_text(errors="replace")[-2000:]
        return text
