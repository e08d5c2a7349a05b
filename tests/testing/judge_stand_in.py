"""A stand-in for a network LLM judge (the one mock these tests allow: no judge model can run here):
an HTTP server on 127.0.0.1 speaking the OpenAI-compatible chat-completions API that pipecat's judge
services (Ollama, OpenAI) use.

Its rule is simple and visible: a criterion names a word in double quotes (`says "shipped"`), and the
answer is yes when that word is in what is judged (the bot's latest reply, or the function call's name
and arguments), no otherwise. Every request is kept in `requests`, so a test can check what the judge
was shown.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StandInJudge:
    """`status=401` refuses every request as a server refusing the key does; `garbage=True` answers
    with text that is not the JSON asked for."""

    def __init__(self, *, status: int = 200, garbage: bool = False):
        self.requests: list[dict] = []
        self.status, self.garbage = status, garbage
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length) or b"{}")
                judge.requests.append(request)
                if judge.status != 200:
                    body = json.dumps({"error": {"message": "invalid api key", "type": "invalid_request_error"}})
                else:
                    content = "I think so." if judge.garbage else judge.answer(request)
                    body = json.dumps(_completion(content))
                body = body.encode()
                self.send_response(judge.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> StandInJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def questions(self) -> list[tuple[str, dict]]:
        """(criterion, state) of every classification the judge was asked, in order."""
        out = []
        for request in self.requests:
            asked = _question(request)
            if asked is not None:
                out.append(asked[1:])
        return out

    def answer(self, request: dict) -> str:
        asked = _question(request)
        if asked is None:  # pipecat's explainer asks for the reason behind a verdict
            return json.dumps({"reason": "stand-in judge: the quoted word is not in what was judged"})
        name, criterion, state = asked
        wanted = re.search(r'"([^"]+)"', criterion)
        judged = state.get("latest_bot_reply") if "latest_bot_reply" in state else json.dumps(state.get("call"))
        yes = wanted is not None and wanted.group(1).lower() in str(judged).lower()
        if name == "verdict":  # a reply: choose yes, no or continue
            p = {"yes": 0.95, "no": 0.03, "continue": 0.02} if yes else {"yes": 0.03, "no": 0.95, "continue": 0.02}
            return json.dumps({name: {"choice": "yes" if yes else "no", "probabilities": p}})
        return json.dumps({name: {"probability": 0.95 if yes else 0.05}})  # a function call: yes or no


def _question(request: dict) -> tuple[str, str, dict] | None:
    """(question name, criterion, state) of a classifier request; None for anything else."""
    text = next((m["content"] for m in request.get("messages", []) if m.get("role") == "user"), "")
    if not isinstance(text, str) or not text.startswith("Input:\n"):
        return None
    state_text, _, questions = text.removeprefix("Input:\n").partition("\n\nQuestion ")
    name = re.match(r'"(\w+)"', questions)
    criterion = re.search(r"Criterion: (.*?\.)(?: |$)", questions)
    if name is None or criterion is None:
        return None
    return name.group(1), criterion.group(1), json.loads(state_text)


def _completion(content: str) -> dict:
    return {
        "id": "stand-in",
        "object": "chat.completion",
        "created": 0,
        "model": "stand-in",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
