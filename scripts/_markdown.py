"""Marked sections of a Markdown file, for the benchmark scripts (each owns its own section)."""

from __future__ import annotations

from pathlib import Path


def update_section(path: Path, section: str, start: str, end: str) -> None:
    """Replace the text between the markers ``start`` and ``end`` (inclusive) with ``section``
    (which carries the markers itself), or append it when the markers are absent; the file is
    re-read just before writing, as other scripts own the other sections."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
