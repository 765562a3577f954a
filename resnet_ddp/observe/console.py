"""What the job prints, through the standard logging module: one format, one place.

Every module logs to `logging.getLogger(__name__)` under the package's logger; a
process attaches its handlers here once (`setup` for a training process,
`setup_launcher` for the launcher). On the console a training process's lines read
`[Rank R] message`, exactly as the original example printed its epoch lines, which
log parsers depend on; the launcher's read `resnet-ddp: message`. Lines go to stdout,
errors to stderr. With --log-format json every line is one JSON object instead
(UTC time, level, rank, host, message, and a step line's figures), for log agents
reading the container's output; --log-timestamps starts each text line with its UTC
time. Levels:

- INFO: routine lines (start-up, step lines, checkpoints, the summary table); --quiet hides them.
- NOTICE: lines --quiet keeps: the original example's epoch lines and last line, load phases.
- WARNING: events a person should see (injected faults, non-finite losses, stragglers, fallbacks).
- ERROR: why the run failed, on stderr.

Rank 0 on an interactive terminal also draws a tqdm progress bar; lines are then
written above it. The per-rank log file (<save-dir>/logs/rank<R>.log) takes every
line with its time, and the tracebacks that the console leaves out.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from typing import List, Optional

from resnet_ddp.core.files import strict_json

PACKAGE_LOGGER = "resnet_ddp"
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")
# On an interactive terminal a line starts by going back to the line's start and clearing it, so that
# another rank's line replaces rank 0's half-drawn progress bar (redrawn below it) instead of joining it.
_CLEAR_LINE = "\r\x1b[K"

log = logging.getLogger(PACKAGE_LOGGER)


def notice(logger: logging.Logger, message: str) -> None:
    logger.log(NOTICE, message)


def interactive_terminal() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


class ProgressBar:
    """Rank 0's tqdm bar over the run's steps, on stderr; console lines are written above it.

    Its total follows the run's length: the steps of --epochs or --max-steps, or, where --duration ends the
    run first, the steps it will have run by then at the current speed. On success it ends full.
    """

    def __init__(self, total_steps: int, steps_done: int):
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bar = tqdm(
            total=total_steps,
            initial=steps_done,
            unit="step",
            file=sys.stderr,
            desc="[Rank 0] training",
            mininterval=0.5,
            smoothing=0.1,
            dynamic_ncols=True,
        )
        self._done = steps_done

    def advance(self, global_step: int) -> None:
        """Every step: a host-side count, no device work; tqdm redraws at most twice a second."""
        self._bar.update(global_step - self._done)
        self._done = global_step

    def set_total(self, total_steps: int) -> None:
        if total_steps != self._bar.total:
            self._bar.total = max(total_steps, self._done)

    def write(self, line: str) -> None:
        self._tqdm.write(line, file=sys.stdout, end="")
        sys.stdout.flush()

    def show(self, figures: dict) -> None:
        self._bar.set_postfix_str(
            f"epoch {figures['epoch']}, loss {figures['loss']:.4f}, {figures['job_img_s']:.0f} img/s", refresh=False
        )

    def close(self, complete: bool) -> None:
        if complete:  # a run that ended as planned ends the bar full, whatever the estimate said
            self._bar.total = self._done
            self._bar.refresh()
        self._bar.close()


def utc_time(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """`[Rank R] message` (or `resnet-ddp: message` in the launcher), each line of a message so; optionally
    after the UTC time. Tracebacks are the log file's."""

    def __init__(self, prefix: str, timestamps: bool):
        super().__init__()
        self.prefix, self.timestamps = prefix, timestamps

    def format(self, record: logging.LogRecord) -> str:
        when = utc_time(record.created) + " " if self.timestamps else ""
        return "\n".join(f"{when}{self.prefix}{line}" for line in record.getMessage().split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, rank (null for the launcher), host, message, and
    the figures a line carries (a step line's record, the run summary)."""

    def __init__(self, rank: Optional[int]):
        super().__init__()
        self.rank, self.host = rank, socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": utc_time(record.created),
            "level": record.levelname,
            "rank": self.rank,
            "host": self.host,
            "message": record.getMessage(),
        }
        for key, value in getattr(record, "fields", {}).items():
            line.setdefault(key, value)
        return json.dumps(strict_json(line), allow_nan=False)


class ConsoleHandler(logging.Handler):
    """stdout for lines, stderr for errors (and, in the launcher, warnings), one write per line (so ranks sharing
    a terminal do not interleave); through the progress bar while there is one."""

    def __init__(self, clear_line: bool, stderr_from: int = logging.ERROR):
        super().__init__()
        self.bar: Optional[ProgressBar] = None
        self.prefix = _CLEAR_LINE if clear_line else ""
        self.stderr_from = stderr_from

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if record.levelno >= self.stderr_from:
                sys.stderr.write(self.prefix + line)
                sys.stderr.flush()
            elif self.bar is not None:
                self.bar.write(line)
            else:
                sys.stdout.write(self.prefix + line)
                sys.stdout.flush()
        except BrokenPipeError:  # the reader of our output has gone: nothing more can be said
            pass
        except Exception:
            self.handleError(record)


class FileFormatter(logging.Formatter):
    """The log file's lines: UTC time, level, rank, message, and any traceback in full."""

    def __init__(self, rank: int):
        super().__init__(
            fmt=f"%(asctime)s.%(msecs)03dZ %(levelname)s [Rank {rank}] %(message)s", datefmt="%Y-%m-%dT%H:%M:%S"
        )
        self.converter = time.gmtime


class Console:
    """This process's handlers: made once by `setup`, closed once by `close` (the worker's teardown)."""

    def __init__(self, handlers: List[logging.Handler], console: ConsoleHandler):
        self.handlers = handlers
        self.console = console

    def start_bar(self, total_steps: int, steps_done: int) -> Optional[ProgressBar]:
        """Rank 0's bar, on an interactive terminal and without --quiet (in a pod's log, lines stay plain)."""
        if self.console.prefix and self.console.level <= logging.INFO:
            self.console.bar = ProgressBar(total_steps, steps_done)
        return self.console.bar

    def stop_bar(self, complete: bool = False) -> None:
        bar, self.console.bar = self.console.bar, None
        if bar is not None:
            bar.close(complete)

    def close(self) -> None:
        self.stop_bar()
        for handler in self.handlers:
            log.removeHandler(handler)
            handler.close()


def _formatter(log_format: str, timestamps: bool, rank: Optional[int]) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(rank)
    return TextFormatter(f"[Rank {rank}] " if rank is not None else "resnet-ddp: ", timestamps)


def _attach(handlers: List[logging.Handler]) -> None:
    for old in list(log.handlers):  # a torchrun worker's launcher part attached its own before
        log.removeHandler(old)
        old.close()
    log.setLevel(logging.DEBUG)
    log.propagate = False  # another library's logging set-up must not print our lines twice
    for handler in handlers:
        log.addHandler(handler)


def setup(
    rank: int, quiet: bool, log_file: Optional[str] = None, log_format: str = "text", timestamps: bool = False
) -> Console:
    """Attach a training process's console (and log file) to the package's logger."""
    console = ConsoleHandler(clear_line=interactive_terminal() and log_format == "text")
    console.setLevel(NOTICE if quiet else logging.INFO)
    console.setFormatter(_formatter(log_format, timestamps, rank))
    handlers: List[logging.Handler] = [console]
    if log_file is not None:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setLevel(logging.DEBUG)
        to_file.setFormatter(FileFormatter(rank))
        handlers.append(to_file)
    _attach(handlers)
    return Console(handlers, console)


def setup_launcher(log_format: str = "text", timestamps: bool = False) -> None:
    """The launcher's lines (`resnet-ddp: ...`): warnings and errors on stderr, the rest on stdout."""
    console = ConsoleHandler(clear_line=False, stderr_from=logging.WARNING)
    console.setFormatter(_formatter(log_format, timestamps, None))
    _attach([console])
