"""Cached sweeps (lessons 10, 17 and 18): a header that says how each file was made, and its write.

A lesson that cannot afford a sweep live reads it from ``notebooks/data/``; the header names the
command that regenerates it, the date and the versions, so a reader can tell what it measured.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch


def cache_header(script: str, argv: Sequence[str]) -> dict[str, str]:
    """``command`` (``python <script> <argv>``), ``created`` (UTC date), ``torch`` and ``python`` versions."""
    return {
        "command": shlex.join(["python", script, *argv]),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_cache(path: Path, record: Mapping[str, Any], indent: int | None = None) -> None:
    """Write ``record`` as JSON to ``path`` atomically (a crash leaves the old file, not half a new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=indent) + "\n")
    os.replace(tmp, path)
