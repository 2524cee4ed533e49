"""Context managers that put back what a call changed on the caller's objects."""

import contextlib
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import Tensor, nn


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


@contextlib.contextmanager
def evaluation_mode(forward_func: object) -> Iterator[None]:
    """Every module ``forward_func`` runs is in eval mode inside the block, and gets
    its mode back on exit. A module is switched up front; for any other callable (a
    lambda around a model) each module is switched by a global forward pre-hook as it
    first runs, before it computes anything."""
    previous_modes: Dict[int, Tuple[nn.Module, bool]] = {}

    def switch_to_eval(module: nn.Module, args: object = None) -> None:
        if id(module) in previous_modes:
            return
        for submodule in module.modules():
            previous_modes.setdefault(id(submodule), (submodule, submodule.training))
            submodule.training = False

    handle = None
    if isinstance(forward_func, nn.Module):
        switch_to_eval(forward_func)
    else:
        handle = nn.modules.module.register_module_forward_pre_hook(switch_to_eval)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for module, mode in previous_modes.values():
            module.training = mode


class ModulesRun:
    """The modules a forward function runs, each with its buffers as they were just
    before it ran: all of a module's submodules, or for any other callable (a lambda,
    a partial, an object around a model) those a global forward pre-hook sees run
    during its first pass.

    A lambda around a model (``lambda x: model(x)[0]``) thus gets the same BatchNorm
    and random-state handling as the model itself, and later passes can start from
    the buffers the first pass started from.
    """

    def __init__(self) -> None:
        self.modules: List[nn.Module] = []
        self._initial_buffers: Dict[int, Dict[str, Tensor]] = {}

    @contextlib.contextmanager
    def recording(self, forward_func: object) -> Iterator[None]:
        if isinstance(forward_func, nn.Module):  # known without a hook, which would
            self._record(forward_func)  # make torch.compile recompile at every call
            yield
            return
        handle = nn.modules.module.register_module_forward_pre_hook(self._on_forward)
        try:
            yield
        finally:
            handle.remove()

    def _on_forward(self, module: nn.Module, args: object) -> None:
        if not torch.compiler.is_compiling():  # a compiled module is recorded whole
            self._record(module)

    def _record(self, module: nn.Module) -> None:
        for submodule in module.modules():
            if id(submodule) in self._initial_buffers:
                continue
            self.modules.append(submodule)
            self._initial_buffers[id(submodule)] = {
                name: buffer.detach().clone()
                for name, buffer in submodule._buffers.items()
                if buffer is not None
            }

    def initial_buffers(self) -> Iterator[Tuple[nn.Module, str, Tensor]]:
        for module in self.modules:
            for name, value in self._initial_buffers[id(module)].items():
                yield module, name, value


def training_batch_norms(modules: Sequence[nn.Module]) -> List[nn.Module]:
    """The BatchNorm layers in training mode among ``modules`` (a ``ModulesRun``'s,
    which hold every submodule already)."""
    return [
        module
        for module in modules
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
def initial_buffers_in_place(run: ModulesRun) -> Iterator[None]:
    """Later passes run on copies of the buffers as they were before the first
    pass: the first pass has updated the originals (BatchNorm statistics, a spectral
    norm's power iteration), and later passes must neither see nor repeat that.

    The originals are put back untouched afterwards: restoring them in place would
    break the backward of the graphs that saved them (BatchNorm saves its running
    statistics for backward)."""
    originals = [(module, name, module._buffers[name]) for module, name, _ in run.initial_buffers()]
    for module, name, value in run.initial_buffers():
        module._buffers[name] = value.clone()
    try:
        yield
    finally:
        for module, name, buffer in originals:
            module._buffers[name] = buffer


@contextlib.contextmanager
def state_restored_on_error(run: ModulesRun, rng: ReplayableRandomState) -> Iterator[None]:
    """A call that fails after its first forward pass (on a target out of range, or
    the model raising) leaves every buffer the pass updated (BatchNorm and
    InstanceNorm statistics) and the random state as they were."""
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for module, name, value in run.initial_buffers():
                module._buffers[name].copy_(value)
        rng.restore()
        raise


@contextlib.contextmanager
def forward_hooks(hooks: Sequence[Tuple[nn.Module, object]]) -> Iterator[None]:
    """Register each (module, hook) as a forward hook for the block; removed on exit."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def no_global_random_draws(device: torch.device, refusal: str) -> Iterator[None]:
    """Raise a RuntimeError with ``refusal`` if the block drew from the global random
    generators (CPU, or the CUDA device's); restore them in any case."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        cpu_changed = not torch.equal(torch.get_rng_state(), cpu_state)
        cuda_changed = cuda_state is not None and not torch.equal(
            torch.cuda.get_rng_state(device), cuda_state
        )
        if cpu_changed:
            torch.set_rng_state(cpu_state)
        if cuda_changed:
            torch.cuda.set_rng_state(cuda_state, device)
    if cpu_changed or cuda_changed:
        raise RuntimeError(refusal)
