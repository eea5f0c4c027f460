"""`running_server`: an `lmlab serve` process for tests that need a real OpenAI-compatible endpoint."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO

_READY = re.compile(r"^serving (?P<model>.+) at (?P<url>http://\S+/v1)$")


@contextmanager
def running_server(ref: str | os.PathLike | None, *, output_dir: str | os.PathLike | None = None,
                   extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                   timeout: float = 120) -> Iterator[str]:
    """Start `python -m lmlab serve REF` (OMP_NUM_THREADS=1, plus `env`), wait until GET /v1/models answers, yield
    its base URL `http://127.0.0.1:PORT/v1`, and stop it afterwards (SIGTERM; SIGKILL after 10 s).

    The server is started with `--port 0` and the port read from its ready line ('serving ID at URL'), so tests
    running side by side never race for a port. Raises RuntimeError with the server's stderr when it exits, or
    does not answer within `timeout` seconds."""
    server = ServerProcess(ref, output_dir=output_dir, extra_args=extra_args, env=env)
    try:
        yield server.wait_ready(timeout)
    finally:
        server.stop()


class ServerProcess:
    """`running_server` in two steps, for a test that does other work while the server loads (~10 s of imports):
    the process starts here, `wait_ready()` returns the base URL once it answers, `stop()` ends it."""

    def __init__(self, ref: str | os.PathLike | None, *, output_dir: str | os.PathLike | None = None,
                 extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None):
        self.ref = str(ref) if ref is not None else " ".join(map(str, extra_args))  # None: e.g. --gguf FILE
        cmd = [sys.executable, "-m", "lmlab", "serve", *([str(ref)] if ref is not None else []), "--port", "0"]
        if output_dir is not None:
            cmd += ["--output-dir", str(output_dir)]
        cmd += [str(a) for a in extra_args]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=full_env)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=_pump, args=(self.proc.stdout, self._lines), daemon=True)
        self._reader.start()
        self.url: str | None = None

    def wait_ready(self, timeout: float = 120) -> str:
        """The base URL once GET /v1/models answers (any HTTP status: a key may be required)."""
        if self.url is None:
            self.url = _wait_until_ready(self, timeout)
        return self.url

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def stop(self, grace: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Read the server's stdout to the end (a full pipe would block it)."""
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _wait_until_ready(server: ServerProcess, timeout: float) -> str:
    proc, deadline = server.proc, time.monotonic() + timeout

    def fail(why: str) -> RuntimeError:
        server.stop()
        return RuntimeError(f"lmlab serve {server.ref}: {why}; its stderr:\n{server.stderr()[-6000:]}")

    url = None
    while url is None:
        if proc.poll() is not None:
            raise fail(f"exited with status {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise fail(f"not ready after {timeout:g} s")
        try:
            line = server._lines.get(timeout=0.2)
        except queue.Empty:
            continue
        match = _READY.match(line.strip()) if line is not None else None
        if match:
            url = match["url"].replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")
    while True:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=5).close()
            return url
        except urllib.error.HTTPError:  # it answered (401 when an API key is required)
            return url
        except OSError:
            if proc.poll() is not None:
                raise fail(f"exited with status {proc.returncode} before answering") from None
            if time.monotonic() > deadline:
                raise fail(f"GET {url}/models did not answer within {timeout:g} s") from None
            time.sleep(0.1)
