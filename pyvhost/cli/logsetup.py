"""Logging of the pyvhost commands: text (the default) or JSON lines (``--log-format json``:
one object per line with time, level, logger and message), and rate-limited repeats: the
same warning or error (by logger and format string, whatever its arguments) is written at most
REPEATS times per WINDOW seconds; the rest are counted and reported in one line with the
first one after the window. A bad peer or a storm of bad requests cannot flood the log. Only the
standard logging module here; nothing of the switch."""

from __future__ import annotations

import json
import logging
import sys
import time

REPEATS = 5
WINDOW = 10.0
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 6), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class RepeatLimit(logging.Filter):
    """At most ``repeats`` records per (logger, format string) per ``window`` seconds."""

    def __init__(self, repeats: int = REPEATS, window: float = WINDOW, clock=time.monotonic):
        super().__init__()
        self.repeats, self.window, self.clock = repeats, window, clock
        self.seen: dict[tuple, list] = {}           # key -> [window start, count, record]

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "summary", False) or record.levelno < logging.WARNING:
            return True                             # (-v/-vv asked for every message)
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        entry = self.seen.get(key)
        if entry is None or now - entry[0] >= self.window:
            if entry is not None and entry[1] > self.repeats:
                self._summary(entry)
            if len(self.seen) > 4096:                # forget old keys (bounded memory)
                self.seen = {k: v for k, v in self.seen.items() if now - v[0] < self.window}
            self.seen[key] = [now, 1, record]
            return True
        entry[1] += 1
        return entry[1] <= self.repeats

    def _summary(self, entry: list) -> None:
        first = entry[2]
        logging.getLogger(first.name).log(
            first.levelno, "%d more like \"%s\" in %.0f s were not logged",
            entry[1] - self.repeats, str(first.msg), self.window, extra={"summary": True})


def setup(level, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RepeatLimit())
    logging.basicConfig(level=level, handlers=[handler])
