"""A call changes nothing the caller did not ask it to change, whether it succeeds or
fails (a bad argument, or the model itself raising in the middle of a multi-pass call).

The state watched: every module's ``training`` flag, its hook dicts and any
instance attribute ``forward``; the global module hooks; ``requires_grad``, values,
``.grad`` and tensor hooks of every parameter and input tensor; buffers; the global
random state (CPU, and CUDA when available).

The documented exceptions, asserted exactly:

- GradMask on a model in training mode updates BatchNorm running statistics once and
  advances the global random state as one forward of the model would (dropout), on a
  successful call only; a failing call changes neither.
- ``saliency="expected_gradients"`` draws its random path points from the global
  random state.
"""

import copy

import pytest
import torch
from torch import nn

from captum.attr import IntegratedGradients, Saliency

from captum_gradmask import (
    ContrastSaliency,
    GradMask,
    IterativeUnveiling,
    MCAttribution,
    MCDropout,
    differentiable,
    gradmask_penalty,
)
from helpers import (
    FUNCTION_ENTRY_POINTS,
    MODEL_ENTRY_POINTS,
    model_arguments,
    tiny_dropout_cnn,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
)
GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
GRADMASK_ENTRY_POINTS = [name for name in MODEL_ENTRY_POINTS if name.lower().startswith("gradmask")]
MC_ENTRY_POINTS = [name for name in MODEL_ENTRY_POINTS if name.startswith("MC")]


def with_training_modes(names):
    """(name, training) pairs: eval mode for every entry point, training mode too for
    GradMask and MC dropout, the ones that define what they do with it (the others
    run the model as it is, so its dropout draws from the global random state)."""
    in_train_mode = [n for n in names if n.lower().startswith(("gradmask", "mc"))]
    return [(n, False) for n in names] + [(n, True) for n in in_train_mode]


def tensor_state(tensor: torch.Tensor) -> tuple:
    hooks = (tensor._backward_hooks, getattr(tensor, "_post_accumulate_grad_hooks", None))
    return (
        tensor.requires_grad,
        tensor.detach().clone(),
        None if tensor.grad is None else tensor.grad.clone(),
        tuple(tuple(h.keys()) if h else () for h in hooks),
    )


def random_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return (torch.get_rng_state(), *cuda)


def read_state(model, tensors) -> dict:
    modules = list(model.modules()) if model is not None else []
    return {
        "training": [m.training for m in modules],
        "module_hooks": [
            [tuple(getattr(m, name).keys()) for name in MODULE_HOOK_DICTS]
            + [m._is_full_backward_hook, "forward" in m.__dict__]
            for m in modules
        ],
        "global_hooks": [
            tuple(getattr(nn.modules.module, name, {}).keys()) for name in GLOBAL_HOOK_DICTS
        ],
        "parameters": [tensor_state(p) for p in (model.parameters() if model is not None else [])],
        "buffers": {name: b.clone() for name, b in (model.named_buffers() if model is not None else [])},
        "inputs": [tensor_state(t) for t in tensors],
        "random_state": random_state(),
    }


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


class StateWatch:
    """Read the state at creation; ``assert_unchanged(**expected)`` compares the state
    now with it, except for the parts given in ``expected`` (compared with those) and
    those named in ``ignore``."""

    def __init__(self, model, *tensors):
        self.model, self.tensors = model, tensors
        self.before = read_state(model, tensors)

    def assert_unchanged(self, ignore=(), **expected):
        now = read_state(self.model, self.tensors)
        changed = [
            part
            for part, value in self.before.items()
            if part not in ignore and not same(now[part], expected.get(part, value))
        ]
        assert changed == [], f"the call changed {changed}"


def state_after_one_forward(model, x) -> dict:
    """Buffers and random state as one forward of ``model`` from the random state now
    leaves them (run on a copy; the random state is put back)."""
    start = random_state()
    model_copy = copy.deepcopy(model)
    with torch.no_grad():
        model_copy(x)
    expected = {
        "buffers": {name: b.clone() for name, b in model_copy.named_buffers()},
        "random_state": random_state(),
    }
    set_random_state(start)
    return expected


def set_random_state(state) -> None:
    torch.set_rng_state(state[0])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state[1:])


def watched_model(device, batchnorm=True, training=False):
    """The tiny CNN with BatchNorm, a forward hook and a tensor hook on a parameter,
    so hooks dicts are not empty."""
    model = tiny_dropout_cnn(batchnorm=batchnorm).to(device).train(training)
    model[0].register_forward_hook(lambda module, args, output: None)
    model[0].weight.register_hook(lambda gradient: None)
    return model


def watched_arguments(device, requires_grad=False):
    x, mask, baselines = model_arguments(3, device)
    return x.requires_grad_(requires_grad), mask, baselines


CHANGES_THE_WATCH_SEES = [
    ("training", lambda model, x: model[1].train()),
    ("module_hooks", lambda model, x: model[2].register_forward_pre_hook(lambda *args: None)),
    ("module_hooks", lambda model, x: model[2].__dict__.update(forward=lambda x: x)),
    ("global_hooks", lambda model, x: nn.modules.module.register_module_forward_hook(
        lambda *args: None
    )),
    ("parameters", lambda model, x: model[0].weight.requires_grad_(False)),
    ("parameters", lambda model, x: model[0].bias.register_hook(lambda gradient: None)),
    ("parameters", lambda model, x: model(x).sum().backward()),
    ("buffers", lambda model, x: model[1].running_mean.add_(1)),
    ("inputs", lambda model, x: x.requires_grad_()),
    ("inputs", lambda model, x: x.data.add_(1)),
    ("random_state", lambda model, x: torch.rand(1)),
]


@pytest.mark.parametrize("part, change", CHANGES_THE_WATCH_SEES)
def test_the_watch_sees_each_kind_of_change(part, change):
    model, (x, _, _) = watched_model("cpu"), watched_arguments("cpu")
    watch = StateWatch(model, x)
    handle = change(model, x)
    try:
        with pytest.raises(AssertionError, match=f"changed \\['{part}'\\]"):
            watch.assert_unchanged()
    finally:
        if hasattr(handle, "remove"):
            handle.remove()


# --- successful calls ------------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "requires_grad"])
@pytest.mark.parametrize("name", MODEL_ENTRY_POINTS)
def test_successful_call_in_eval_mode_changes_nothing(name, requires_grad, device):
    model = watched_model(device)
    x, mask, baselines = watched_arguments(device, requires_grad)
    watch = StateWatch(model, x, mask, baselines)
    MODEL_ENTRY_POINTS[name].call(model, x, mask, baselines)
    draws_path_points = "expected_gradients" in name
    watch.assert_unchanged(ignore=["random_state"] if draws_path_points else [])


@pytest.mark.parametrize("name", GRADMASK_ENTRY_POINTS)
def test_gradmask_in_train_mode_changes_what_one_forward_would(name, device):
    model = watched_model(device, training=True)
    x, mask, baselines = watched_arguments(device)
    watch = StateWatch(model, x, mask, baselines)
    expected = state_after_one_forward(model, x)
    with pytest.warns(UserWarning, match="BatchNorm in training mode"):
        MODEL_ENTRY_POINTS[name].call(model, x, mask, baselines)
    if "expected_gradients" in name:
        watch.assert_unchanged(ignore=["random_state"], buffers=expected["buffers"])
    else:
        watch.assert_unchanged(**expected)


@pytest.mark.parametrize("name", MC_ENTRY_POINTS)
def test_mc_dropout_in_train_mode_changes_nothing(name, device):
    model = watched_model(device, training=True)
    x, mask, baselines = watched_arguments(device, requires_grad=True)
    watch = StateWatch(model, x, mask, baselines)
    MODEL_ENTRY_POINTS[name].call(model, x, mask, baselines)
    watch.assert_unchanged()


@pytest.mark.parametrize("name", FUNCTION_ENTRY_POINTS)
def test_function_changes_nothing(name, device):
    entry = FUNCTION_ENTRY_POINTS[name]
    arguments = {key: value.to(device) for key, value in entry.arguments(3).items()}
    for value in arguments.values():
        if value.dtype.is_floating_point:
            value.requires_grad_()
    watch = StateWatch(None, *arguments.values())
    entry.call(**arguments)
    watch.assert_unchanged()


# --- failing calls ---------------------------------------------------------------------


class ModelFailure(Exception):
    pass


class RaisesOnForward(nn.Module):
    """``model``, except that forward call number ``failing_call`` raises."""

    def __init__(self, model: nn.Module, failing_call: int) -> None:
        super().__init__()
        self.model, self.failing_call, self.calls = model, failing_call, 0

    def forward(self, *args):
        self.calls += 1
        if self.calls == self.failing_call:
            raise ModelFailure(f"forward call {self.calls} fails")
        return self.model(*args)


def count_forwards(name, model, x, mask, baselines) -> int:
    counting = RaisesOnForward(copy.deepcopy(model), failing_call=0)
    MODEL_ENTRY_POINTS[name].call(counting, x, mask, baselines)
    return counting.calls


@pytest.mark.filterwarnings("ignore:BatchNorm in training mode")
@pytest.mark.parametrize("name, training", with_training_modes(MODEL_ENTRY_POINTS))
def test_model_failing_mid_call_changes_nothing(name, training, device):
    """The model raises on its 1st, 2nd or 3rd forward (as far as the call runs it)."""
    model = watched_model(device, training=training)
    x, mask, baselines = watched_arguments(device, requires_grad=True)
    n_forwards = count_forwards(name, model, x, mask, baselines)
    for failing_call in range(1, min(n_forwards, 3) + 1):
        failing = RaisesOnForward(model, failing_call)
        watch = StateWatch(failing, x, mask, baselines)
        with pytest.raises(ModelFailure):
            MODEL_ENTRY_POINTS[name].call(failing, x, mask, baselines)
        watch.assert_unchanged()


BAD_CALLS = {
    "ContrastSaliency, target out of range": lambda model, x, mask: ContrastSaliency(
        model
    ).attribute(x, target=5),
    "ContrastSaliency, contrast_target == target": lambda model, x, mask: ContrastSaliency(
        model
    ).attribute(x, target=0, contrast_target=0),
    "differentiable(IntegratedGradients), internal_batch_size": lambda model, x, mask: differentiable(
        IntegratedGradients(model)
    ).attribute(x, target=1, internal_batch_size=2),
    "GradMask, target out of range": lambda model, x, mask: GradMask(model, target=5)(x, mask),
    "GradMask, mask out of [0, 1]": lambda model, x, mask: GradMask(model)(x, 2 * mask),
    "gradmask_penalty, a label equal to contrast_target": lambda model, x, mask: gradmask_penalty(
        model, x, mask, target=torch.tensor([1, 0, 1]), method="finite_difference"
    ),
    "gradmask_penalty, has_mask of 2": lambda model, x, mask: gradmask_penalty(
        model, x, mask, has_mask=torch.tensor([0.0, 1.0, 2.0])
    ),
    "IterativeUnveiling.unveil, target out of range": lambda model, x, mask: IterativeUnveiling(
        Saliency(model)
    ).unveil(x, target=5, n_iter=2, kernel_size=3),
    "IterativeUnveiling.attribute, even kernel_size": lambda model, x, mask: IterativeUnveiling(
        Saliency(model)
    ).attribute(x, target=1, n_iter=2, kernel_size=4),
    "MCDropout, mc_samples_batch_size=0": lambda model, x, mask: MCDropout(model, n_samples=3)(
        x, mc_samples_batch_size=0
    ),
    "MCDropout.uncertainty, unknown activation": lambda model, x, mask: MCDropout(
        model, n_samples=3
    ).uncertainty(x, activation="relu"),
    "MCAttribution, target out of range": lambda model, x, mask: MCAttribution(
        Saliency, MCDropout(model, n_samples=3)
    ).attribute(x, target=5),
    "MCAttribution, target list too long": lambda model, x, mask: MCAttribution(
        IntegratedGradients, MCDropout(model, n_samples=3)
    ).attribute(x, target=[1] * (len(x) + 1)),
}


@pytest.mark.filterwarnings("ignore:BatchNorm in training mode")
@pytest.mark.parametrize("name, training", with_training_modes(BAD_CALLS))
def test_bad_argument_changes_nothing(name, training, device):
    model = watched_model(device, training=training)
    x, mask, _ = watched_arguments(device, requires_grad=True)
    watch = StateWatch(model, x, mask)
    with pytest.raises((ValueError, TypeError)):
        BAD_CALLS[name](model, x, mask)
    watch.assert_unchanged()
