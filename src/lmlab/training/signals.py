"""Stopping a run cleanly on a signal: SIGTERM (what spot / preemptible machines send before they reclaim the
machine) and the first Ctrl-C ask the loop to stop after the step in flight; it then checkpoints and pauses. A
second Ctrl-C interrupts at once (the half-done step is dropped; the run still pauses at its last full step)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class StopRequest:
    """Set by a signal handler, read by the loop once per step."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def __bool__(self) -> bool:
        return self.reason is not None

    @contextmanager
    def catching(self):
        """Install the handlers for the duration of a run (main thread only: elsewhere signals cannot be caught)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def on_signal(signum, frame):
            name = signal.Signals(signum).name
            if self.reason is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self.reason = self.reason or f"{name} received"

        try:
            for sig in previous:
                signal.signal(sig, on_signal)
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
