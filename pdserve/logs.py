"""Logging of every pdserve process, set up once at the entry point: human-readable lines, or
one JSON object per line (``--log-format json``) for a log pipeline. Structured records (the
gateway's access lines, the instances' stats lines) carry their fields under a key of the record
(``access``, ``stats``), which the JSON format merges into the object."""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

LOG_FORMATS = ("text", "json")
_STRUCTURED = ("access", "stats")  # extra={...} keys whose dicts become JSON fields
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _STRUCTURED:
            fields = getattr(record, key, None)
            if isinstance(fields, dict):
                obj |= {k: v for k, v in fields.items() if k not in obj}
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def setup_logging(level: str, log_format: str = "text") -> None:
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format: {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def add_log_format(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text",
        help="json: one JSON object per log line (access and stats lines with their fields)",
    )  # fmt: skip
