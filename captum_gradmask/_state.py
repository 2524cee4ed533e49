"""Context managers that put back what a call changed on the caller's objects."""

import contextlib
import functools
import inspect
import types
from typing import Callable, Iterator, List, Sequence

import torch
from torch import nn


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


# Containers are searched this far: a model sits near the top, not in a data set.
_MOST_ITEMS = 64


def modules_of(forward_func: Callable) -> List[nn.Module]:
    """The modules ``forward_func`` runs: itself if it is a module, else the modules
    it reaches as a bound method, a ``functools.partial``, through its closure, its
    defaults, the globals its code names, or the attributes of the objects these
    hold (``lambda x: self.model(x)``), a few levels deep.

    A lambda around a model (``lambda x: model(x)[0]``) thus gets the same
    BatchNorm and random-state handling as the model itself.
    """
    found: List[nn.Module] = []
    seen: set = set()

    def visit(value: object, depth: int) -> None:
        if id(value) in seen or depth > 4:
            return
        seen.add(id(value))
        if isinstance(value, nn.Module):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value[:_MOST_ITEMS]:
                visit(item, depth + 1)
        elif isinstance(value, dict):
            for item in list(value.values())[:_MOST_ITEMS]:
                visit(item, depth + 1)
        elif callable(value):
            for reached in _reached_by_callable(value):
                visit(reached, depth + 1)
        elif hasattr(value, "__dict__") and not isinstance(value, (types.ModuleType, torch.Tensor)):
            for item in list(vars(value).values())[:_MOST_ITEMS]:
                visit(item, depth + 1)

    visit(forward_func, 0)
    return found


def _reached_by_callable(func: object) -> List[object]:
    if isinstance(func, functools.partial):
        return [func.func, *func.args, *func.keywords.values()]
    if inspect.ismethod(func):
        return [func.__self__, func.__func__]
    if inspect.isfunction(func):
        code_names = _names_in_code(func.__code__)
        cells = [cell.cell_contents for cell in func.__closure__ or () if _cell_is_set(cell)]
        named_globals = [func.__globals__[name] for name in code_names if name in func.__globals__]
        return [*cells, *(func.__defaults__ or ()), *named_globals]
    if inspect.isbuiltin(func) or inspect.isclass(func):
        return []
    return list(getattr(func, "__dict__", {}).values())


def _names_in_code(code) -> List[str]:
    """Global names used by ``code`` and by the functions defined inside it."""
    nested = [const for const in code.co_consts if inspect.iscode(const)]
    return [*code.co_names, *(name for inner in nested for name in _names_in_code(inner))]


def _cell_is_set(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a closure variable not yet assigned
        return False
    return True


def training_batch_norms(modules: Sequence[nn.Module]) -> List[nn.Module]:
    """The BatchNorm layers in training mode among ``modules`` and their children."""
    return [
        module
        for root in modules
        for module in root.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
    ]


class ReplayableRandomState:
    """Capture the RNG state before the first forward pass; later passes replay it
    (same dropout masks) without advancing the caller's generator."""

    def __init__(self, device: torch.device) -> None:
        self.cuda_devices = [device] if device.type == "cuda" else []
        self.state = self._get()
        self.first_pass_done = False

    def _get(self):
        return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.cuda_devices]

    def _set(self, state) -> None:
        cpu_state, cuda_states = state
        torch.set_rng_state(cpu_state)
        for device, cuda_state in zip(self.cuda_devices, cuda_states):
            torch.cuda.set_rng_state(cuda_state, device)

    def advance_past_first_pass(self) -> None:
        self.first_pass_done = True

    def restore(self) -> None:
        """Put back the state captured before the first forward pass."""
        self._set(self.state)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        if not self.first_pass_done:
            yield
            return
        after_first_pass = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self._set(after_first_pass)


@contextlib.contextmanager
def preserved_buffers(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Extra forward passes must not update BatchNorm running statistics twice.

    They run on copies of the buffers and the originals are put back untouched:
    restoring them in place would break the backward of the graphs that saved them
    (BatchNorm saves its running statistics for backward)."""
    originals = [
        (module, name, buffer)
        for root in modules
        for module in root.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None
    ]
    for module, name, buffer in originals:
        module._buffers[name] = buffer.clone()
    try:
        yield
    finally:
        for module, name, buffer in originals:
            module._buffers[name] = buffer


@contextlib.contextmanager
def state_restored_on_error(
    modules: Sequence[nn.Module], rng: ReplayableRandomState
) -> Iterator[None]:
    """A call that fails after the first forward pass (on a target out of range, or
    the model raising) leaves BatchNorm running statistics and the random state as
    they were."""
    saved = [
        (buffer, buffer.clone())
        for module in training_batch_norms(modules)
        for buffer in module.buffers(recurse=False)
    ]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        rng.restore()
        raise
