"""baresip as a scripted SIP phone: it dials, speaks WAV files on cue, presses keys (RFC 4733), hangs
up, and its recording of what it decoded is read while the call goes on.

    phone = await Baresip.start(folder, "sip:agent@127.0.0.1:5060")
    started = await phone.play(wav)     # switches the microphone to `wav`; monotonic time it began
    await phone.press("1")
    phone.heard()                       # [(monotonic time, int16 20 ms chunk)] decoded since the last look
    phone.ended                         # the far end hung up
    await phone.close()                 # hang up if still on, quit

baresip (1.0.0, Debian 12) is driven over its `ctrl_tcp` module: netstring-framed JSON commands
(`dial`, `ausrc`, `sndcode`, `hangup`, `quit`), answered with responses and call events. Its microphone is
the `aufile` source, which hangs the call up at the end of its file, so the line keeps it on a long
silence between turns. The `sndfile` module writes each decoded 20 ms packet to a WAV as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
from loguru import logger

from processors.audio_io import write_wav
from transports.sip.sdp import G711_CLOCK_RATE as RATE  # the phone speaks PCMU

BARESIP = shutil.which("baresip")
CHUNK = RATE // 50  # samples per 20 ms packet
SILENCE_SECS = 600  # the microphone's idle file; the call would end when it ran out
START_TIMEOUT_SECS = 15.0
# How long baresip sends one key for (RFC 4733 events over about 240 ms, end packets included). Keys
# pressed faster wait in its queue, so a key's press time would no longer be when it went out.
KEY_SECS = 0.25


class BaresipUnavailable(RuntimeError):
    pass


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_pcm(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    write_wav(path, samples.astype(np.int16, copy=False), rate)
    return path


def configure(folder: Path, microphone: Path, *, ctrl_port: int | None = None) -> Path:
    """A baresip config folder in `folder`: its generated defaults made headless (file microphone, no
    sound card, recordings on, only loopback sockets, no STUN/TURN/ICE), one PCMU account that does not
    register. Returns the config folder; recordings go to `folder/rec`."""
    if BARESIP is None:
        raise BaresipUnavailable("SIP calls are placed from baresip, which is not installed (apt-get install baresip)")
    config = folder / "baresip"
    # `-t 1`: start, write the default files, quit.
    subprocess.run([BARESIP, "-f", str(config), "-t", "1"], stdin=subprocess.DEVNULL, capture_output=True,
                   timeout=20, check=False)  # fmt: skip
    if not (config / "config").exists():
        raise BaresipUnavailable(f"baresip did not write its default config into {config}")
    text = (config / "config").read_text()
    settings = {
        r"^#?sip_listen.*$": f"sip_listen\t\t127.0.0.1:{_free_port(socket.SOCK_DGRAM)}",
        r"^audio_source.*$": f"audio_source\t\taufile,{microphone}",
        r"^audio_player.*$": "audio_player\t\talsa,null",
        r"^audio_alert.*$": "audio_alert\t\talsa,null",
        r"^#?snd_path.*$": f"snd_path\t\t{folder / 'rec'}",
        r"^#module\t+(aufile|sndfile)\.so": r"module\t\t\t\1.so",
        r"^#module_app\t+ctrl_tcp\.so": "module_app\t\tctrl_tcp.so",
        r"^module\t+(stdio|stun|turn|ice)\.so": r"#module\t\t\t\1.so",
        r"^(cons|http)_listen.*$": r"\1_listen\t\t127.0.0.1:0",
        r"^ctrl_tcp_listen.*$": f"ctrl_tcp_listen\t\t127.0.0.1:{ctrl_port or 0}",
    }
    for pattern, value in settings.items():
        text = re.sub(pattern, value, text, flags=re.M)
    (config / "config").write_text(text)
    (config / "accounts").write_text("<sip:caller@127.0.0.1>;regint=0;audio_codecs=PCMU\n")
    (folder / "rec").mkdir(exist_ok=True)
    return config


def _netstring(message: dict) -> bytes:
    body = json.dumps(message).encode()
    return str(len(body)).encode() + b":" + body + b","


class Baresip:
    """One baresip process placing one call; made by `start()`."""

    def __init__(self, folder: Path, silence: Path, process: asyncio.subprocess.Process, reader, writer):
        self.folder = folder
        self.silence = silence
        self._process = process
        self._reader, self._writer = reader, writer
        self._tokens = itertools.count(1)
        self._waiting: dict[str, asyncio.Future] = {}
        self.established = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_reason = ""
        self._hung_up = False
        self._recording: Path | None = None
        self._data_at = 0
        self._read_bytes = 0
        self._last_read = time.monotonic()
        self._heard: list[tuple[float, np.ndarray]] = []
        self._events = asyncio.create_task(self._read_events())
        self._watch = asyncio.create_task(self._watch_recording())

    @classmethod
    async def start(cls, folder: Path, uri: str) -> Baresip:
        """Start baresip in `folder` and dial `uri`; returns once the call is answered."""
        ctrl_port = _free_port(socket.SOCK_STREAM)
        silence = write_pcm(folder / "silence.wav", np.zeros(RATE * SILENCE_SECS, np.int16))
        config = await asyncio.to_thread(configure, folder, silence, ctrl_port=ctrl_port)
        process, reader, writer = await launch(folder, config, ctrl_port)
        phone = cls(folder, silence, process, reader, writer)
        await phone.command("dial", uri)
        deadline = time.monotonic() + START_TIMEOUT_SECS
        while not (phone.established.is_set() or phone.closed.is_set()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if not phone.established.is_set():
            reason = phone.close_reason or f"no answer in {START_TIMEOUT_SECS:g} s"
            await phone.close()
            raise RuntimeError(f"baresip's call to {uri} failed ({reason}): {cls._log_tail(folder)}")
        return phone

    @staticmethod
    def _log_tail(folder: Path) -> str:
        log = folder / "baresip.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip() and "audio=" not in ln]
        return " | ".join(lines[-6:]) or "(nothing logged)"

    async def command(self, name: str, params: str = "") -> dict:
        token = str(next(self._tokens))
        answer = asyncio.get_running_loop().create_future()
        self._waiting[token] = answer
        self._writer.write(_netstring({"command": name, "params": params, "token": token}))
        await self._writer.drain()
        reply = await asyncio.wait_for(answer, 5.0)
        if not reply.get("ok"):
            raise RuntimeError(f"baresip refused /{name} {params}: {reply.get('data')}")
        return reply

    async def _read_events(self) -> None:
        buffer = b""
        while True:
            data = await self._reader.read(4096)
            if not data:
                self.closed.set()
                return
            buffer += data
            while b":" in buffer:
                length, rest = buffer.split(b":", 1)
                if len(rest) < int(length) + 1:
                    break
                message, buffer = json.loads(rest[: int(length)]), rest[int(length) + 1 :]
                if message.get("response"):
                    waiting = self._waiting.pop(str(message.get("token")), None)
                    if waiting is not None and not waiting.done():
                        waiting.set_result(message)
                elif message.get("type") == "CALL_ESTABLISHED":
                    self.established.set()
                elif message.get("type") == "CALL_CLOSED":
                    self.close_reason = message.get("param", "")
                    self.closed.set()

    @property
    def ended(self) -> bool:
        """The call is over and this phone did not hang it up."""
        return self.closed.is_set() and not self._hung_up

    async def play(self, wav: Path) -> float:
        """Make `wav` (8 kHz mono int16) the microphone; returns the monotonic time it took over."""
        await self.command("ausrc", f"aufile,{wav}")
        return time.monotonic()

    async def press(self, digit: str) -> None:
        await self.command("sndcode", digit)

    def heard(self) -> list[tuple[float, np.ndarray]]:
        """The 20 ms chunks decoded since the last call, each stamped with the monotonic time it arrived."""
        taken, self._heard = self._heard, []
        return taken

    async def _watch_recording(self) -> None:
        # Looked at every 20 ms whatever the caller is doing, so each chunk's stamp is fresh: the chunks
        # written since the last look are spaced 20 ms apart back from now, none before that look.
        while True:
            now = time.monotonic()
            fresh = self._read_recording()
            count = len(fresh) // CHUNK
            self._heard += [
                (max(self._last_read, now - (count - 1 - i) * 0.02), fresh[i * CHUNK : (i + 1) * CHUNK])
                for i in range(count)
            ]
            self._last_read = now
            await asyncio.sleep(0.02)

    def _read_recording(self) -> np.ndarray:
        if self._recording is None:
            found = sorted((self.folder / "rec").glob("*-dec.wav"))
            if not found:
                return np.zeros(0, np.int16)
            self._recording = found[0]
        with self._recording.open("rb") as f:
            if not self._data_at:
                head = f.read(512)
                at = head.find(b"data")
                if at < 0:
                    return np.zeros(0, np.int16)
                self._data_at = self._read_bytes = at + 8
            f.seek(self._read_bytes)
            data = f.read()
        whole = len(data) // (CHUNK * 2) * CHUNK * 2  # whole packets only; the rest is read next time
        self._read_bytes += whole
        return np.frombuffer(data[:whole], "<i2")

    async def hang_up(self) -> None:
        if not self.closed.is_set():
            self._hung_up = True
            with contextlib.suppress(Exception):
                await self.command("hangup")

    async def close(self) -> None:
        await self.hang_up()
        with contextlib.suppress(Exception):
            await self.command("quit")
        try:
            await asyncio.wait_for(self._process.wait(), 3.0)
        except TimeoutError:  # it waits out the transactions of a call that never connected
            logger.debug("baresip did not quit in 3 s; killing it")
            with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
                self._process.kill()
            await self._process.wait()
        self._watch.cancel()
        self._events.cancel()
        await asyncio.gather(self._watch, self._events, return_exceptions=True)
        self._writer.close()


async def launch(folder: Path, config: Path, ctrl_port: int):
    """Start baresip on `config` (its log in `folder`) and connect to its control port:
    (process, reader, writer). Killed, with its log's tail in the error, when the port never opens."""
    log = (folder / "baresip.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        BARESIP, "-f", str(config), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    deadline = time.monotonic() + START_TIMEOUT_SECS
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", ctrl_port)
            return process, reader, writer
        except OSError:
            if process.returncode is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):  # already exited: its log says why
                    process.kill()
                await process.wait()
                raise RuntimeError(f"baresip did not start its control port: {Baresip._log_tail(folder)}") from None
            await asyncio.sleep(0.05)
