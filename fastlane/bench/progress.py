"""Progress display: one line per measurement, updated in place on a terminal.

Why a ticker thread: a measurement takes seconds to minutes with no output of its own; a line
whose elapsed time keeps moving tells the operator the bench is alive. Off a terminal (CI logs,
pipes) only the finished lines are printed, so logs stay readable.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._label = ""
        self._t0 = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_all = time.monotonic()

    def _prefix(self) -> str:
        width = len(str(self.total))
        return f"[{self.done + 1:>{width}}/{self.total}]"

    def start(self, label: str) -> None:
        with self._lock:
            self._label = label
            self._t0 = time.monotonic()
        if self.tty:
            self._draw()
            if self._thread is None:
                self._thread = threading.Thread(target=self._tick, daemon=True)
                self._thread.start()

    def _draw(self) -> None:
        with self._lock:
            if not self._label:
                return
            el = time.monotonic() - self._t0
            self.stream.write(f"\r\x1b[K{self._prefix()} {self._label} ... {el:4.1f}s")
            self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self._draw()

    def finish(self, result: str, count: bool = True) -> None:
        """End the current line; `count=False` for steps that are not measurements (set-up)."""
        with self._lock:
            el = time.monotonic() - self._t0
            line = f"{self._prefix()} {self._label} {result} ({el:.1f}s)"
            self.stream.write(("\r\x1b[K" if self.tty else "") + line + "\n")
            self.stream.flush()
            self._label = ""
            self.done += int(count)

    def skip(self, n: int) -> None:
        """Measurements that will not run (their path failed): keep the counter honest."""
        with self._lock:
            self.done += n

    def note(self, text: str) -> None:
        with self._lock:
            self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)
        if self.tty and self._label:
            self.stream.write("\n")
            self.stream.flush()
