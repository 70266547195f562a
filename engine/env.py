"""Every environment variable pdserve reads, typed, read once at startup (``Env.read()``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Env:
    cache_dir: Path  # PDSERVE_CACHE_DIR, else $XDG_CACHE_HOME/pdserve, else ~/.cache/pdserve
    log_level: str  # PDSERVE_LOG_LEVEL (default INFO)
    api_key: str | None = field(default=None, repr=False)  # PDSERVE_API_KEY: the gateway requires it

    @classmethod
    def read(cls) -> Env:
        xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cls(
            cache_dir=Path(os.environ.get("PDSERVE_CACHE_DIR") or xdg / "pdserve"),
            log_level=os.environ.get("PDSERVE_LOG_LEVEL", "INFO").upper(),
            api_key=os.environ.get("PDSERVE_API_KEY") or None,
        )
