"""Context managers that put back what a call changed on the caller's objects."""

import contextlib
from typing import Iterator, Sequence

import torch


@contextlib.contextmanager
def preserved_requires_grad(tensors: Sequence[object]) -> Iterator[None]:
    """Restore the ``requires_grad`` flag of every leaf tensor in ``tensors`` on exit.

    Captum's attribution methods switch ``requires_grad`` on for their inputs and do
    not switch it back when they raise; this puts the flags back in every case.
    """
    leaves = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_leaf]
    flags = [t.requires_grad for t in leaves]
    try:
        yield
    finally:
        for tensor, flag in zip(leaves, flags):
            tensor.requires_grad_(flag)


@contextlib.contextmanager
def preserved_training_modes(module: torch.nn.Module) -> Iterator[None]:
    """Restore the ``training`` flag of ``module`` and every submodule on exit."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    try:
        yield
    finally:
        for submodule, mode in modes:
            submodule.training = mode
