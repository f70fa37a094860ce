"""Logging set-up: the human format with the operator markers, or one JSON object per line.

The markers (``[DONE]``, ``[RESTART]``, ``[RECOVERY]``, ``[PROACTIVE]``, ``[WARN]``, ``[ERROR]``)
start the message in both formats; the JSON format lifts them into ``marker`` and adds the
request id and the event's numbers, which the code passes as ``extra=`` fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_MARKER = re.compile(r"^\[([A-Z]+)\]\s*")
_REQUEST_ID = re.compile(r"\brequest_id=(\S+)")
# Attributes every LogRecord has; anything else on a record came in through ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName",
}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "marker", "request_id", "event", ...numbers}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        marker = _MARKER.match(message)
        request_id = getattr(record, "request_id", None)
        if request_id is None and (found := _REQUEST_ID.search(message)):
            request_id = found.group(1)
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "marker": marker.group(1) if marker else None,
            "request_id": request_id,
            "event": message[marker.end():] if marker else message,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out and isinstance(
                value, int | float | str | bool | None
            ):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at ``level`` in ``log_format`` (``text`` or ``json``)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Hypercorn's access lines would carry client addresses for every health poll.
    logging.getLogger("hypercorn.access").setLevel(logging.WARNING)
