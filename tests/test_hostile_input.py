"""Every public entry point, fed hostile tensors, works or says clearly what is wrong.

The cases: NaN or Inf in inputs, masks or baselines; an empty batch; a zero-size
spatial dimension; integer, bool and complex dtypes; non-contiguous and
channels_last layouts; tensors on another device; huge finite values.

The rule each case checks:

- NaN or Inf in any tensor argument, an empty batch, a zero-size dimension, and a
  tensor on another device than the others (or than the model's parameters) raise a
  ``ValueError`` whose message names the argument.
- Another dtype either works (finite results, shaped as for float64) or raises a
  ``TypeError`` / ``ValueError`` naming the argument: masks, labels and regions may be
  bool or integer; inputs, attributions and probabilities must be floating point.
- Non-contiguous and channels_last tensors give the results of their contiguous copy.
- Huge finite values (1e30, +-finfo.max): functions of maps (``refine_mask``, the
  metrics) must give finite results; probabilities that large are invalid and
  refused. A model may overflow on them: an entry point that runs the model then
  returns finite results or raises a ``ValueError`` that names ``inputs`` (its
  results hold NaN or Inf although the inputs are finite). It never returns NaN or
  Inf silently.

Never a deep error (a RuntimeError from inside torch, an IndexError, a Captum
assertion) and never a silent NaN or Inf.
"""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (
    FUNCTION_ENTRY_POINTS,
    MODEL_ENTRY_POINTS,
    SIDE,
    model_arguments,
    result_tensors,
    tiny_dropout_cnn,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
HUGE = st.sampled_from([1e30, -1e30, torch.finfo(torch.float64).max, -torch.finfo(torch.float64).max])
OTHER_DTYPES = [torch.int64, torch.uint8, torch.bool, torch.complex128]
LAYOUTS = {
    "transposed": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() > 1 else t,
    "strided": lambda t: torch.stack([t, t + 1], dim=-1)[..., 0],
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t,
}


def other_device(device: str) -> str:
    """A device to mix with ``device``: CUDA and the CPU where both exist, else the
    meta device (shapes without values)."""
    if device != "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "meta"


def with_one_value(tensor: torch.Tensor, position: int, value: float) -> torch.Tensor:
    changed = tensor.clone()
    changed.view(-1)[position % changed.numel()] = value
    return changed


def assert_names_argument(error: Exception, names) -> None:
    assert isinstance(error, (ValueError, TypeError)), repr(error)
    assert re.search("|".join(names), str(error)), f"{error!r} names none of {names}"


def assert_finite_results(result, reference=None) -> None:
    tensors = result_tensors(result)
    for tensor in tensors:
        assert torch.isfinite(tensor).all(), tensor
    if reference is not None:
        assert [t.shape for t in tensors] == [t.shape for t in result_tensors(reference)]


def assert_works_or_names(call, names, reference=None) -> None:
    """``call()`` returns finite results (shaped like ``reference``'s) or raises a
    ValueError or TypeError naming one of ``names``."""
    try:
        result = call()
    except (ValueError, TypeError) as error:
        assert_names_argument(error, names)
        return
    assert_finite_results(result, reference)


def assert_raises_naming(call, names) -> None:
    with pytest.raises((ValueError, TypeError)) as raised:
        call()
    assert_names_argument(raised.value, names)


def assert_same_results(result, reference) -> None:
    for ours, theirs in zip(result_tensors(result), result_tensors(reference), strict=True):
        torch.testing.assert_close(ours, theirs)


# --- entry points that run a model ---------------------------------------------------

ARGUMENT_NAMES = ("inputs", "mask", "baselines")


def model_cases():
    """(entry point, argument) pairs for the arguments each entry point reads."""
    return [
        (name, argument)
        for name, entry in MODEL_ENTRY_POINTS.items()
        for argument, used in zip(ARGUMENT_NAMES, (True, entry.uses_mask, entry.uses_baselines))
        if used
    ]


def run_model_entry(name, changes=None, device="cpu", n=2, model=None):
    """Run an entry point on the tiny model and arguments, some of them changed."""
    arguments = dict(zip(ARGUMENT_NAMES, model_arguments(n, device)))
    for argument, change in (changes or {}).items():
        arguments[argument] = change(arguments[argument])
    model = (model or tiny_dropout_cnn()).to(device)
    torch.manual_seed(0)  # expected gradients draws its path points
    return MODEL_ENTRY_POINTS[name].call(model, *arguments.values())


@settings(max_examples=15)
@given(value=NON_FINITE, position=st.integers(0, 99))
@pytest.mark.parametrize("name, argument", model_cases())
def test_model_entry_non_finite_value_raises(name, argument, value, position, device):
    assert_raises_naming(
        lambda: run_model_entry(name, {argument: lambda t: with_one_value(t, position, value)}, device),
        [argument],
    )


@pytest.mark.parametrize("name", MODEL_ENTRY_POINTS)
def test_model_entry_empty_batch_raises(name, device):
    empty = {argument: lambda t: t[:0] for argument in ARGUMENT_NAMES}
    assert_raises_naming(lambda: run_model_entry(name, empty, device), ["inputs"])


@pytest.mark.parametrize("name", MODEL_ENTRY_POINTS)
def test_model_entry_zero_size_spatial_dimension_raises(name, device):
    no_width = {argument: lambda t: t[..., :0] for argument in ARGUMENT_NAMES}
    assert_raises_naming(lambda: run_model_entry(name, no_width, device), ["inputs"])


@pytest.mark.parametrize("dtype", OTHER_DTYPES, ids=str)
@pytest.mark.parametrize("name, argument", model_cases())
def test_model_entry_other_dtype_works_or_raises(name, argument, dtype, device):
    reference = run_model_entry(name, device=device)
    assert_works_or_names(
        lambda: run_model_entry(name, {argument: lambda t: t.round().to(dtype)}, device),
        [argument],
        reference,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", MODEL_ENTRY_POINTS)
def test_model_entry_layout_does_not_change_results(name, layout, device):
    reference = run_model_entry(name, device=device)
    changes = {argument: LAYOUTS[layout] for argument in ARGUMENT_NAMES}
    assert_same_results(run_model_entry(name, changes, device), reference)


@pytest.mark.parametrize("name, argument", model_cases())
def test_model_entry_tensor_on_other_device_raises(name, argument, device):
    other = other_device(device)
    assert_raises_naming(
        lambda: run_model_entry(name, {argument: lambda t: t.to(other)}, device), [argument]
    )


def linear_model() -> torch.nn.Module:
    """Unlike the tanh CNN, its logits overflow on huge inputs."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Dropout(0.25), torch.nn.Linear(2 * SIDE * SIDE, 2)
    ).double().eval()


@settings(max_examples=10)
@given(value=HUGE, position=st.integers(0, 99), everywhere=st.booleans())
@pytest.mark.parametrize("make_model", [tiny_dropout_cnn, linear_model], ids=["tanh_cnn", "linear"])
@pytest.mark.parametrize("name", MODEL_ENTRY_POINTS)
def test_model_entry_huge_inputs_work_or_raise(name, make_model, value, position, everywhere, device):
    def huge(t):
        return torch.full_like(t, value) if everywhere else with_one_value(t, position, value)

    assert_works_or_names(
        lambda: run_model_entry(name, {"inputs": huge}, device, model=make_model()), ["inputs"]
    )


# --- entry points that take tensors only --------------------------------------------


def function_cases(float_only=False):
    """(entry point, argument) pairs, for every tensor argument (floating-point ones
    only if ``float_only``)."""
    return [
        (name, argument)
        for name, entry in FUNCTION_ENTRY_POINTS.items()
        for argument, tensor in entry.arguments(2).items()
        if tensor.dtype.is_floating_point or not float_only
    ]


def run_function_entry(name, changes=None, device="cpu", n=2):
    entry = FUNCTION_ENTRY_POINTS[name]
    arguments = {key: value.to(device) for key, value in entry.arguments(n).items()}
    for argument, change in (changes or {}).items():
        arguments[argument] = change(arguments[argument])
    return entry.call(**arguments)


@settings(max_examples=20)
@given(value=NON_FINITE, position=st.integers(0, 99), n=st.integers(1, 3))
@pytest.mark.parametrize("name, argument", function_cases(float_only=True))
def test_function_non_finite_value_raises(name, argument, value, position, n, device):
    assert_raises_naming(
        lambda: run_function_entry(
            name, {argument: lambda t: with_one_value(t, position, value)}, device, n
        ),
        [argument],
    )


@pytest.mark.parametrize("name", FUNCTION_ENTRY_POINTS)
def test_function_empty_batch_raises(name, device):
    arguments = FUNCTION_ENTRY_POINTS[name].arguments(1)
    empty = {argument: lambda t: t[:0] for argument in arguments}
    assert_raises_naming(lambda: run_function_entry(name, empty, device), list(arguments))


@pytest.mark.parametrize("name", [n for n, e in FUNCTION_ENTRY_POINTS.items() if n != "roc_auc"])
def test_function_zero_size_spatial_dimension_raises(name, device):
    arguments = FUNCTION_ENTRY_POINTS[name].arguments(1)
    no_width = {argument: lambda t: t[..., :0] for argument in arguments}
    assert_raises_naming(lambda: run_function_entry(name, no_width, device), list(arguments))


@pytest.mark.parametrize("dtype", OTHER_DTYPES, ids=str)
@pytest.mark.parametrize("name, argument", function_cases())
def test_function_other_dtype_works_or_raises(name, argument, dtype, device):
    reference = run_function_entry(name, device=device)
    assert_works_or_names(
        lambda: run_function_entry(name, {argument: lambda t: t.round().to(dtype)}, device),
        [argument],
        reference,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", FUNCTION_ENTRY_POINTS)
def test_function_layout_does_not_change_results(name, layout, device):
    reference = run_function_entry(name, device=device)
    arguments = FUNCTION_ENTRY_POINTS[name].arguments(1)
    changes = {argument: LAYOUTS[layout] for argument in arguments}
    assert_same_results(run_function_entry(name, changes, device), reference)


@pytest.mark.parametrize(
    "name, argument",
    [(n, a) for n, a in function_cases() if len(FUNCTION_ENTRY_POINTS[n].arguments(1)) > 1],
)
def test_function_tensor_on_other_device_raises(name, argument, device):
    other = other_device(device)
    arguments = FUNCTION_ENTRY_POINTS[name].arguments(1)
    assert_raises_naming(
        lambda: run_function_entry(name, {argument: lambda t: t.to(other)}, device),
        list(arguments),
    )


@settings(max_examples=20)
@given(value=HUGE, position=st.integers(0, 99), everywhere=st.booleans(), n=st.integers(1, 3))
@pytest.mark.parametrize("name, argument", function_cases(float_only=True))
def test_function_huge_values_give_finite_results(name, argument, value, position, everywhere, n, device):
    def huge(t):
        return torch.full_like(t, value) if everywhere else with_one_value(t, position, value)

    call = lambda: run_function_entry(name, {argument: huge}, device, n)  # noqa: E731
    if name == "predictive_uncertainty":  # probabilities cannot be huge
        assert_raises_naming(call, [argument])
    else:
        assert_finite_results(call(), run_function_entry(name, device=device, n=n))
