"""Twilio's REST API replaced by a local HTTP server: the real twilio client, pointed at 127.0.0.1,
records each request (path, headers, raw form body) and answers as Twilio does for a call update."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client


class LocalTwilioCloud:
    def __init__(self, account_sid: str, auth_token: str):
        self.requests: list[dict] = []
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                cloud.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                sid = self.path.rsplit("/", 1)[-1].removesuffix(".json")
                payload = json.dumps({"sid": sid, "account_sid": account_sid, "status": "in-progress"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        base = f"http://127.0.0.1:{self._server.server_address[1]}"

        class LocalHttpClient(TwilioHttpClient):
            """The real requests-based client, with api.twilio.com pointed at the local server."""

            def request(self, method, url, *args, **kwargs):
                assert url.startswith("https://api.twilio.com/"), url
                return super().request(method, url.replace("https://api.twilio.com", base, 1), *args, **kwargs)

        self.client = Client(account_sid, auth_token, http_client=LocalHttpClient())

    @classmethod
    @contextlib.contextmanager
    def running(cls, account_sid: str, auth_token: str) -> Iterator[LocalTwilioCloud]:
        cloud = cls(account_sid, auth_token)
        thread = threading.Thread(target=cloud._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield cloud
        finally:
            cloud._server.shutdown()
            cloud._server.server_close()
