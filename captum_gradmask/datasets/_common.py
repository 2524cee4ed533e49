"""Helpers shared by the offline data sets: splits, seeds, checks, optional imports."""

import importlib
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_gradmask._validation import is_int

SPLITS = ("train", "valid", "test")


def import_optional(module_name: str) -> ModuleType:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"this data set needs {module_name!r}: pip install captum-gradmask[datasets]"
        ) from error


def split_generator(seed: int, split: str) -> torch.Generator:
    """A private CPU generator; each (seed, split) pair gets its own stream.

    Mixing the split into the seed keeps ``split="train", seed=0`` and
    ``split="test", seed=0`` from drawing the same images.
    """
    check_split(split)
    return torch.Generator().manual_seed(len(SPLITS) * seed + SPLITS.index(split))


def resolve_confound(confound: Optional[float], split: str, train: float, held_out: float) -> float:
    """``confound`` if given, else the default of the split (train or valid/test)."""
    check_split(split)
    if confound is None:
        return train if split == "train" else held_out
    if not 0.0 <= confound <= 1.0:
        raise ValueError(f"confound must be in [0, 1], got {confound!r}")
    return float(confound)


def bernoulli(probabilities: Tensor, generator: torch.Generator) -> Tensor:
    """Bool draws, True with the given per-sample probabilities (float64, CPU)."""
    return torch.rand(probabilities.shape, generator=generator, dtype=torch.float64) < probabilities


def artifact_draws(labels: Tensor, confound: float, generator: torch.Generator) -> Tensor:
    """Which images carry the artifact: each label-1 image with probability
    ``confound``, each label-0 image with ``1 - confound`` (0.5: independent)."""
    probabilities = torch.where(labels == 1, confound, 1 - confound).to(torch.float64)
    return bernoulli(probabilities, generator)


def resize(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of (N, C, H, W) images to (N, C, size, size)."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def check_split(split: object) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def check_count(name: str, value: object, minimum: int = 1) -> None:
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
