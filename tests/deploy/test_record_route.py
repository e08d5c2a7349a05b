"""A SIP call through Kamailio (deploy/kamailio.cfg) stays on the server that answered it: the server's 200
OK keeps the proxy's Record-Route, the caller's ACK reaches the server along that route, and the server's
own BYE goes back through the proxy to the caller, whose 200 comes back the same way."""

import asyncio
from pathlib import Path

import pytest

from agent.testing.front_doors import KAMAILIO, SIPP, Kamailio, SippRun
from transports.sip.sdp import negotiate
from transports.sip.server import SipServer

SCENARIO = Path(__file__).parent / "scenarios" / "uac_server_hangs_up.xml"

pytestmark = [
    pytest.mark.skipif(KAMAILIO is None, reason="kamailio is not installed (apt-get install kamailio)"),
    pytest.mark.skipif(SIPP is None, reason="sipp is not installed (apt-get install sip-tester)"),
]


class HangsUpSoon:
    """Answers, then hangs up half a second after the ACK; records what happened."""

    def __init__(self):
        self.dialogs = []
        self.ends: list[str] = []
        self.tasks: set[asyncio.Task] = set()

    async def offer(self, dialog, sdp: bytes) -> bytes:
        return negotiate(sdp, local_ip="127.0.0.1", local_port=40000).sdp.encode()

    async def start(self, dialog) -> None:
        self.dialogs.append(dialog)

        async def later():
            await asyncio.sleep(0.5)
            await dialog.hang_up()

        task = asyncio.create_task(later())
        self.tasks.add(task)

    async def end(self, dialog, reason: str) -> None:
        self.ends.append(reason)


async def test_ack_and_the_servers_bye_follow_the_record_route_through_kamailio(tmp_path):
    handler = HangsUpSoon()
    server = SipServer(handler, host="127.0.0.1", port=0)
    byes = []
    start_request = server.start_request

    def recording(request, addr):
        transaction = start_request(request, addr)
        byes.append((request, addr, transaction))
        return transaction

    server.start_request = recording
    await server.start()
    kamailio = Kamailio(tmp_path / "kamailio", [server.port], probe_seconds=1)
    try:
        await asyncio.to_thread(kamailio.start)
        run = SippRun(tmp_path / "sipp", kamailio.port, calls=1, timeout=20)
        run.command[run.command.index("-sf") + 1] = str(SCENARIO)
        await asyncio.to_thread(run.start().finish)
        assert (run.successful, run.failed) == (1, 0), run.errors()  # the BYE reached the caller
        (dialog,) = handler.dialogs  # the ACK reached the server: the call started
        assert len(dialog.route_set) == 1 and f"127.0.0.1:{kamailio.port};lr" in dialog.route_set[0]
        ((bye, addr, transaction),) = byes
        assert bye.method == "BYE" and addr[1] == kamailio.port  # sent to the proxy...
        assert bye.headers_all("Route") == dialog.route_set  # ...along the route
        assert (await asyncio.wait_for(transaction.result, 10)).status == 200  # the caller's 200 came back
        assert handler.ends == ["hangup"]
    finally:
        kamailio.stop()
        await server.stop()
        for task in handler.tasks:
            task.cancel()
