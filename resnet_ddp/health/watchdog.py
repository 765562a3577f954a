"""A last-resort timer: a rank whose training loop makes no progress for --dist-timeout ends itself.

NCCL's own watchdog times out collectives it launched, but not those replayed
from a CUDA graph, and a host blocked reading a result from a stream that waits
on a hung peer would otherwise wait forever. The loop calls `beat()` after every
step (one float store, no device work); a thread checks the time since the last
beat and, past the timeout, says why on stderr and exits the process with 1,
so the launcher (or torchrun) stops the other ranks as for any failed rank.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

from resnet_ddp.core.callbacks import Callback


class ProgressWatchdog(Callback):
    def __init__(self, rank: int, timeout_s: float):
        self.rank = rank
        self.timeout_s = timeout_s
        self._last_beat: Optional[float] = None  # armed by the first beat: start-up (compile, capture) is not timed
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="progress-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def pause(self) -> None:
        """Until the next beat: for work between steps that may rightly take long (the end-of-run export)."""
        self._last_beat = None

    def on_end(self, state, outcome) -> None:
        """The steps are over: what follows (the last checkpoint's write, the export) may rightly take long."""
        self.stop()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(min(5.0, self.timeout_s / 4)):
            last = self._last_beat
            if last is not None and time.monotonic() - last > self.timeout_s:
                # Printed, not logged: the last words of a process that may be stuck anywhere, logging included.
                print(
                    f"[Rank {self.rank}] error: no training step finished in {self.timeout_s:g} s "
                    "(--dist-timeout): a peer rank hung or died, or a collective is stuck; exiting",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)
