"""Errors raised by the task layer. Every message names the problem and the fix."""

from __future__ import annotations


class TaskDataError(Exception):
    """Base class for data problems (missing, corrupt or incompatible files)."""


class DatasetNotFoundError(TaskDataError, FileNotFoundError):
    """A dataset's files are not where the loader looked."""


class CorruptDatasetError(TaskDataError):
    """A dataset file exists but cannot be read (truncated zip, bad image, wrong md5, ...)."""


class EpisodeSpecError(TaskDataError, ValueError):
    """An episode specification the dataset cannot satisfy (too many ways, shots, ...)."""
