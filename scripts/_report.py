"""Shared by the benchmark scripts: the JSON report (written to ``--out`` if given, and printed)
and the paired ratio of two interleaved arms."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_json(result: dict[str, Any], out: str | None) -> str:
    """Dump ``result`` (indent 1), write it to ``out`` when given, print it; returns the text."""
    text = json.dumps(result, indent=1)
    if out:
        Path(out).write_text(text + "\n")
    print(text)
    return text


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median over rounds of ``a[i] / b[i]``: for arms timed in the same interleaved rounds,
    load that drifts between rounds hits both and cancels, which the ratio of the two medians
    does not guarantee."""
    if len(a) != len(b) or not a:
        raise ValueError(
            f"paired_ratio needs two equally long, non-empty series; got {len(a)}, {len(b)}"
        )
    return statistics.median(x / y for x, y in zip(a, b))
