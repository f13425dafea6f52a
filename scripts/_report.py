"""The JSON report of a benchmark script: written to ``--out`` if given, and printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(result: dict[str, Any], out: str | None) -> str:
    """Dump ``result`` (indent 1), write it to ``out`` when given, print it; returns the text."""
    text = json.dumps(result, indent=1)
    if out:
        Path(out).write_text(text + "\n")
    print(text)
    return text
