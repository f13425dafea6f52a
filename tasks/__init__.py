"""Episodic task distributions for few-shot learning, usable without the rest of the toolkit."""

from tasks.benchmarks import TaskSets, available_tasksets, get_tasksets, register_tasksets
from tasks.dataset import (
    ClassDataset,
    ConcatClasses,
    RotatedClasses,
    SubsetClasses,
    TensorClassDataset,
    check_episode_spec,
)
from tasks.episode import Episode
from tasks.errors import (
    CorruptDatasetError,
    DatasetNotFoundError,
    EpisodeSpecError,
    TaskDataError,
)
from tasks.sampler import EpisodeSource, TaskSampler

__all__ = [
    "ClassDataset",
    "ConcatClasses",
    "CorruptDatasetError",
    "DatasetNotFoundError",
    "Episode",
    "EpisodeSource",
    "EpisodeSpecError",
    "RotatedClasses",
    "SubsetClasses",
    "TaskDataError",
    "TaskSampler",
    "TaskSets",
    "available_tasksets",
    "get_tasksets",
    "register_tasksets",
    "TensorClassDataset",
    "check_episode_spec",
]
