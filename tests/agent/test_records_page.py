"""The web page's calls view in headless Chromium: recent calls from the records, one call's transcript
and its recording in an audio player, with the admin token carried from the page's ?token= when the
server listens beyond loopback."""

import asyncio
import time

import numpy as np
import pytest

from agent.runtime import AgentRuntime
from agent.server import create_app
from agent.spec import load_agent
from agent.testing.browser import CHROMIUM, Page, chromium
from agent.testing.lines import serving
from records.recording import drain_recordings
from tests.agent.test_records_calls import RECORDS
from tests.agent.test_twilio_call import agent_file

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
TOKEN = "page-token-1"


async def until(page: Page, expression: str, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await page.evaluate(expression)
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {expression}")


async def test_the_page_lists_calls_and_plays_one_with_its_transcript(tmp_path, tiny_model, monkeypatch):
    path = agent_file(tmp_path)
    path.write_text(path.read_text() + RECORDS)
    runtime = AgentRuntime(load_agent(path), model=tiny_model)
    await runtime.records.start()
    # One recorded call, as a call's handlers would leave it.
    recorder = runtime.records.recorder(transport="sip", in_rate=8000, voice="demo")
    recorder.identify({"sip_call_id": "abc@host"}, caller="sip:alice@example.com")
    recorder.start()
    recorder.answered()
    recorder.note("user_speaking", {"speaking": True})
    recorder.caller_audio((np.ones(8000, np.int16) * 3000).tobytes(), 8000)
    recorder.note("user_speaking", {"speaking": False})
    recorder.reply_started(1)
    recorder.note("agent_text", {"text": "Your order ships Friday.", "interrupted": False, "sent_text": "Your order ships Friday."})
    recorder.end("caller_hung_up")
    drain_recordings()
    for _ in range(100):
        if runtime.records.writer.pending == 0:
            break
        await asyncio.sleep(0.05)

    app = create_app(runtime, public_url="https://agent.example.com")
    app.state.listen_host = "0.0.0.0"  # as if reachable from outside: the token is needed
    monkeypatch.setenv("CHROMA_AGENTS_ADMIN_TOKEN", TOKEN)
    async with serving(app) as host, chromium() as devtools:
        async with Page.open(devtools, f"http://{host}/") as page:  # no token: the view says why
            error = await until(page, "document.getElementById('records-error').textContent", "the refusal")
            assert "admin token" in error
        async with Page.open(devtools, f"http://{host}/?token={TOKEN}") as page:
            await until(page, "document.querySelectorAll('#call-list li').length === 1", "the call in the list")
            row = await page.evaluate("document.querySelector('#call-list li').textContent")
            assert "sip" in row and "sip:alice@example.com" in row and "caller hung up" in row
            await page.evaluate("document.querySelector('#call-list li').click()")
            await until(page, "document.querySelectorAll('#call-events li').length >= 2", "the transcript")
            lines = await page.evaluate("[...document.querySelectorAll('#call-events li')].map(li => li.textContent)")
            assert any("caller spoke (0.0 s)" in x for x in lines) and any("Your order ships Friday." in x for x in lines)
            src = await page.evaluate("document.getElementById('call-audio').src")
            assert src.endswith(f"/api/calls/{recorder.record_id}/recording?token={TOKEN}")
            # the player loads the recording through the guarded route
            duration = await until(
                page,
                "(() => { const a = document.getElementById('call-audio'); a.load();"
                " return new Promise(r => { a.onloadedmetadata = () => r(a.duration); a.onerror = () => r(-1);"
                " setTimeout(() => r(0), 5000); }); })()",
                "the recording to load",
            )
            assert duration > 0.9
    await runtime.close()
