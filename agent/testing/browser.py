"""Headless Chromium, driven over the DevTools protocol: the real WebRTC client of the conversation
tests and of the server's browser tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import websockets

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
START_TIMEOUT_SECS = 30


class BrowserUnavailable(RuntimeError):
    """Chromium is not installed."""


@contextlib.asynccontextmanager
async def chromium(*args: str):
    """A headless Chromium (extra command-line `args` added); yields its DevTools HTTP address."""
    if CHROMIUM is None:
        raise BrowserUnavailable("WebRTC calls are placed from headless Chromium, which is not installed "
                                 "(apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="chromium-")
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--autoplay-policy=no-user-gesture-required",
            *args,
            # Port 0: Chromium picks a free one and writes it to DevToolsActivePort in the profile.
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_SECS
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None:
                raise BrowserUnavailable(f"{CHROMIUM} exited with {proc.returncode} on start")
            if time.monotonic() > deadline:
                raise BrowserUnavailable(f"{CHROMIUM} did not open its DevTools port in {START_TIMEOUT_SECS} s")
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port_file.read_text().split()[0]}"
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


class PageError(RuntimeError):
    """Script run in the page threw."""


class Page:
    """One browser tab; `evaluate` runs a script in it (one at a time) and returns its value."""

    def __init__(self, ws, devtools: str, target_id: str):
        self.ws, self.devtools, self.target_id = ws, devtools, target_id
        self.next_id = 0
        self._lock = asyncio.Lock()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, devtools: str, url: str):
        # The whole URL is one escaped query string, or its own '&' would end it.
        request = urllib.request.Request(f"{devtools}/json/new?{urllib.parse.quote(url, safe='')}", method="PUT")
        target = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(request, timeout=10)))
        async with websockets.connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
            page = cls(ws, devtools, target["id"])
            await page._loaded(url)
            yield page

    async def _loaded(self, url: str, timeout: float = START_TIMEOUT_SECS) -> None:
        """Until the tab shows `url`, loaded: a script run sooner would be lost with the blank page."""
        check = f"location.href === {json.dumps(url)} && document.readyState === 'complete'"
        deadline = time.monotonic() + timeout
        while not await self.evaluate(check):
            if time.monotonic() > deadline:
                raise PageError(f"{url} did not load in the browser within {timeout:g} s")
            await asyncio.sleep(0.05)

    def close_tab(self) -> None:
        urllib.request.urlopen(f"{self.devtools}/json/close/{self.target_id}", timeout=10).read()

    async def evaluate(self, expression: str):
        async with self._lock:
            self.next_id += 1
            call_id = self.next_id
            params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
            await self.ws.send(json.dumps({"id": call_id, "method": "Runtime.evaluate", "params": params}))
            while (reply := json.loads(await self.ws.recv())).get("id") != call_id:
                pass
        if "error" in reply:
            raise PageError(f"DevTools refused Runtime.evaluate: {reply['error'].get('message')}")
        result = reply["result"]
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise PageError(details.get("exception", {}).get("description") or details.get("text"))
        return result.get("result", {}).get("value")
