"""Log formatting shared by the daemons: text for people, one JSON object per line for machines.

Fields can carry what a peer sent (a BYE reason, an ERROR code, a guest id, a path), so
the text format must not let them forge a line: a value that is not plain printable ASCII
without spaces, quotes, ``=`` or backslashes is written as a JSON string (``reason="a\nb"``),
and control characters in the message are escaped the same way. One record is one line
(a traceback, the host's own, is the only thing that continues it).
"""

from __future__ import annotations

import json
import logging
import re
import time

#: printable ASCII except space, '"', '=' and '\': safe unquoted in key=value
_PLAIN = re.compile(r"[!#-<>-\[\]-~]+")
#: what could start a new line or hide text on a terminal
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def field(value: object) -> str:
    """One ``key=value`` value: as is when plain, else a JSON string (one line, ASCII)."""
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


def _escape(match: re.Match) -> str:
    char = match.group()
    return json.dumps(char)[1:-1] if ord(char) < 0x80 else f"\\u{ord(char):04x}"


def one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\u001b``, ``\\u2028``)."""
    return _CONTROL.sub(_escape, text) if _CONTROL.search(text) else text


_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={...}`` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable line with ``key=value`` extras appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = one_line(record.message)
        line = super().formatMessage(record)
        extras = [f"{key}={field(value)}" for key, value in vars(record).items()
                  if key not in _RESERVED and not key.startswith("_")]
        return f"{line} {' '.join(extras)}" if extras else line


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
