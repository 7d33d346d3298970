"""Progress of one data file: a tqdm bar on a terminal, plain lines in a log file.

When the stream is not a TTY (output redirected to a file, CI), a line is written when the file starts, at
every `step` percent of its samples and when it ends, so a log shows how far a long evaluation got.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None, step: int = 10) -> None:
        self.label, self.total, self.step = label, total, step
        self.stream = stream or sys.stderr
        self.done, self.start = 0, time.perf_counter()
        self.next_percent = step
        self.bar = None
        if self.stream.isatty():
            self.bar = tqdm(total=total, desc=label, unit="sample", leave=False, file=self.stream)
        else:
            self._line(f"{total} samples")

    def _line(self, text: str) -> None:
        print(f"{self.label}: {text}", file=self.stream, flush=True)

    def _rate(self) -> str:
        seconds = time.perf_counter() - self.start
        rate = self.done / seconds if seconds > 0 else 0.0
        return f"{seconds:.1f} s, {rate:.2f} samples/s"

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        percent = 100 * self.done // max(self.total, 1)
        if percent >= self.next_percent and self.done < self.total:
            self._line(f"{self.done}/{self.total} samples ({percent} %), {self._rate()}")
            self.next_percent = (percent // self.step + 1) * self.step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(f"done, {self.done} samples in {self._rate()}")
