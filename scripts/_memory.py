"""Peak resident memory of the current process, for the benchmark scripts (Linux; elsewhere a
fallback).

``getrusage(RUSAGE_SELF).ru_maxrss`` is not the process's own peak after ``exec``: Linux keeps
the larger of it and the *parent's* resident size at ``fork``, so a child started from a big
process (a test runner, a notebook) reports the parent's size until it outgrows it, and every
"peak above idle" difference comes out as 0. ``VmHWM`` in ``/proc/self/status`` is the high-water
mark of this process's own address space, which ``exec`` resets.
"""

from __future__ import annotations

import resource


def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_kib() -> int:
    """This process's peak resident set size in KiB: ``VmHWM`` where ``/proc`` has it, else
    ``ru_maxrss`` (KiB on Linux, bytes on macOS, where it is converted)."""
    try:
        return status_kib("VmHWM")
    except (OSError, RuntimeError):
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak
