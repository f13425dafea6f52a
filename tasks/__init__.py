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

# Dataset classes load lazily so that importing ``tasks`` stays cheap and one format's optional
# pieces never break another's import.
_LAZY = {
    "Omniglot": "tasks.omniglot",
    "LakeRuns": "tasks.lake",
    "MiniImageNet": "tasks.miniimagenet",
    "TieredImageNet": "tasks.tieredimagenet",
    "ImageFolderClasses": "tasks.folder",
    "GlyphClasses": "tasks.glyphs",
    "SinusoidTasks": "tasks.sinusoid",
    "TorchmetaBatches": "tasks.compat",
    "L2LTaskView": "tasks.compat",
    "EpisodesFromCallable": "tasks.compat",
    "EpisodesFromTaskset": "tasks.compat",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")


__all__ = [
    *_LAZY,
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
