"""FakeJudge: a scripted OpenAI-compatible judge endpoint on loopback, for the judge and judged-sweep tests (what is
under test is the client side; the round trip with a real `lmlab serve` is in tests/evaluation/test_judge.py)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeJudge:
    """An OpenAI-compatible /v1/chat/completions endpoint: `answer(prompt) -> str | int` (an int is an HTTP error
    status), optional delay, and a request count."""

    def __init__(self, answer, delay: float = 0.0):
        self.answer, self.delay, self.calls, self.prompts = answer, delay, 0, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                owner.calls += 1
                owner.prompts.append(prompt)
                time.sleep(owner.delay)
                out = owner.answer(prompt)
                if isinstance(out, int):
                    payload, status = {"error": {"message": "scripted failure", "type": "server_error"}}, out
                else:
                    payload, status = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                       "choices": [{"index": 0, "finish_reason": "stop",
                                                    "message": {"role": "assistant", "content": out}}]}, 200
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
