"""Logging for both programs: one JSON object per line for machines, readable lines for terminals."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Context fields callers pass with ``extra=``; they become top-level keys of the JSON line.
CONTEXT_FIELDS = ("job_id", "connector_id", "tenant", "printer_id", "remote", "event", "audit", "replica")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """One readable line; the context fields follow as ``key=value`` so a terminal shows them too."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = [
            f"{name}={record.__dict__[name]}"
            for name in CONTEXT_FIELDS
            if name != "audit" and record.__dict__.get(name) is not None
        ]
        if not context:
            return line
        head, sep, rest = line.partition("\n")  # a traceback stays below the context
        return f"{head} [{' '.join(context)}]{sep}{rest}"


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}: use debug, info, warning or error")
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Library chatter below warning is noise for operators.
    for noisy in ("httpx", "httpcore", "hpack", "h2"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
