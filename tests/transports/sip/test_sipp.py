"""The SIP server against a real SIP stack: SIPp runs the scenarios in scenarios/ as the caller.

SIPp's exit code says whether every message it expected arrived in order; the recording handler says
what the server told the application.
"""

import asyncio
import random
import shutil
import socket
from pathlib import Path

import pytest

from transports.sip.sdp import negotiate
from transports.sip.server import SipServer

SIPP = shutil.which("sipp")
SCENARIOS = Path(__file__).parent / "scenarios"
pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp is not installed (apt-get install sip-tester)")


class Recorder:
    """A call handler that answers with `sdp.negotiate` and records what it was told."""

    def __init__(self):
        self.events: list[tuple] = []
        self.delay = 0.0
        self.on_start = None
        self.server: SipServer | None = None
        self.most_calls = 0
        self.tasks: set[asyncio.Task] = set()

    async def offer(self, dialog, offer: bytes) -> bytes:
        self.events.append(("offer", dialog.call_id))
        if self.delay:
            await asyncio.sleep(self.delay)
        return negotiate(offer, local_ip="127.0.0.1", local_port=40000).sdp.encode()

    async def start(self, dialog) -> None:
        self.events.append(("start", dialog.call_id))
        self.most_calls = max(self.most_calls, len(self.server.dialogs))
        if self.on_start is not None:
            task = asyncio.create_task(self.on_start(dialog))
            self.tasks.add(task)

    async def end(self, dialog, reason: str) -> None:
        self.events.append(("end", dialog.call_id, reason))

    def reasons(self) -> list[str]:
        return [event[2] for event in self.events if event[0] == "end"]

    async def wait_for_ends(self, count: int, timeout: float = 10.0) -> None:
        async def ended():
            while len(self.reasons()) < count:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(ended(), timeout)


def free_udp_port(span: int = 1) -> int:
    """A port P with P..P+span-1 free on 127.0.0.1 (SIPp's media port also takes the ones after it)."""
    for _ in range(200):
        port = random.randrange(20000, 60000, 2)
        sockets = []
        try:
            for offset in range(span):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(sock)
                sock.bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free UDP port found")


async def sipp(
    scenario: str, server_port: int, workdir: Path, *options: str, calls: int = 1, timeout: int = 30
):
    """Run SIPp as the caller; (exit code, what it printed, its error log)."""
    command = [
        SIPP, "-sf", str(SCENARIOS / scenario), "-s", "agent", "-i", "127.0.0.1",
        "-p", str(free_udp_port()), "-mp", str(free_udp_port(4)), "-m", str(calls),
        "-nostdin", "-timeout", f"{timeout}s", "-timeout_error", "-trace_err", *options,
        f"127.0.0.1:{server_port}",
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, cwd=workdir, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout + 15)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    errors = "\n".join(path.read_text(errors="replace")[-3000:] for path in workdir.glob("*_errors.log"))
    return process.returncode, output.decode(errors="replace")[-3000:], errors


def succeeded(result) -> bool:
    code, output, errors = result
    assert code == 0, f"sipp exited {code}\n{output}\n{errors}"
    return True


@pytest.fixture
async def agent(request):
    handler = Recorder()
    server = SipServer(handler, host="127.0.0.1", port=0, **getattr(request, "param", {}))
    handler.server = server
    await server.start()
    yield server, handler
    await server.stop()
    for task in handler.tasks:
        task.cancel()


async def test_sipp_call_invite_ok_ack_bye(agent, tmp_path):
    server, handler = agent
    assert succeeded(await sipp("uac_call.xml", server.port, tmp_path, "-d", "300"))
    await handler.wait_for_ends(1)
    assert [event[0] for event in handler.events] == ["offer", "start", "end"]
    assert handler.reasons() == ["bye"] and server.dialogs == {}


async def test_sipp_cancel_before_answer(agent, tmp_path):
    server, handler = agent
    handler.delay = 1.0  # SIPp cancels as soon as it sees 180, long before the answer
    assert succeeded(await sipp("uac_cancel.xml", server.port, tmp_path))
    await handler.wait_for_ends(1)
    assert handler.reasons() == ["cancel"]
    assert not any(event[0] == "start" for event in handler.events)


async def test_sipp_options_ping(agent, tmp_path):
    server, handler = agent
    assert succeeded(await sipp("uac_options.xml", server.port, tmp_path))
    assert handler.events == []


async def test_sipp_offer_with_port_70000_is_488_and_the_call_never_starts(agent, tmp_path):
    server, handler = agent
    assert succeeded(await sipp("uac_bad_sdp.xml", server.port, tmp_path))
    assert handler.events == [("offer", handler.events[0][1])]  # refused in offer(): no 200, no start
    assert server.dialogs == {}


async def test_sipp_busy_when_the_application_says_so(agent, tmp_path):
    server, handler = agent
    server.busy = lambda: "at capacity: 32 of max_sessions 32"
    assert succeeded(await sipp("uac_busy.xml", server.port, tmp_path))
    assert handler.events == []


@pytest.mark.parametrize("agent", [{"max_calls": 1}], indirect=True)
async def test_sipp_busy_at_capacity(agent, tmp_path):
    server, handler = agent
    first_dir, second_dir = tmp_path / "holder", tmp_path / "busy"
    first_dir.mkdir()
    second_dir.mkdir()
    holder = asyncio.create_task(sipp("uac_call.xml", server.port, first_dir, "-d", "3000"))

    async def one_call_up():
        while not any(event[0] == "start" for event in handler.events):
            await asyncio.sleep(0.02)

    await asyncio.wait_for(one_call_up(), 10)
    assert succeeded(await sipp("uac_busy.xml", server.port, second_dir))
    assert succeeded(await holder)
    assert [event[0] for event in handler.events].count("offer") == 1


@pytest.mark.parametrize("agent", [{"max_calls": 30}], indirect=True)
async def test_sipp_load_25_concurrent_calls(agent, tmp_path):
    server, handler = agent
    calls = 25
    result = await sipp(
        "uac_call.xml", server.port, tmp_path, "-d", "2500", "-r", str(calls), "-rp", "1000",
        "-l", str(calls), calls=calls, timeout=45,
    )  # fmt: skip
    assert succeeded(result)
    await handler.wait_for_ends(calls)
    assert handler.reasons() == ["bye"] * calls
    assert len({event[1] for event in handler.events if event[0] == "start"}) == calls
    assert handler.most_calls >= 20  # they overlapped, rather than running one after another
    assert server.counts["internal_error"] == 0


async def test_sipp_receives_refer_then_server_bye(agent, tmp_path):
    server, handler = agent
    transferred = []

    async def transfer_then_hang_up(dialog):
        transferred.append(await dialog.refer("sip:transfer@example.com"))
        await dialog.hang_up()

    handler.on_start = transfer_then_hang_up
    assert succeeded(await sipp("uac_refer_then_bye.xml", server.port, tmp_path))
    await handler.wait_for_ends(1)
    assert transferred == [True]
    assert handler.reasons() == ["hangup"]
