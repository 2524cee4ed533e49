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
from typing import Callable, Dict, NamedTuple, Tuple

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


# --- every public entry point, driven the same way ----------------------------------



class Entry(NamedTuple):
    """One public entry point as these tests drive it."""

    arguments: Callable[[int], Dict[str, torch.Tensor]]  # its tensors for a batch of n
    call: Callable[[Dict[str, torch.Tensor], str], object]  # (tensors, device) -> result
    reads: Tuple[str, ...]  # the arguments it reads, which an error may blame
    runs_model: bool  # the model's parameters fix the device


def _model_entry(entry) -> Entry:
    def call(arguments, device):
        model = tiny_dropout_cnn().to(device)
        torch.manual_seed(0)  # expected gradients draws its path points
        return entry.call(model, *arguments.values())

    names = ("inputs", "mask", entry.baselines_name)
    used = (True, entry.uses_mask, entry.uses_baselines)
    return Entry(
        arguments=lambda n: dict(zip(names, model_arguments(n))),
        call=call,
        reads=tuple(name for name, read in zip(names, used) if read),
        runs_model=True,
    )


def _function_entry(entry) -> Entry:
    return Entry(entry.arguments, lambda arguments, device: entry.call(**arguments),
                 tuple(entry.arguments(1)), runs_model=False)


ENTRIES = {
    **{name: _model_entry(entry) for name, entry in MODEL_ENTRY_POINTS.items()},
    **{name: _function_entry(entry) for name, entry in FUNCTION_ENTRY_POINTS.items()},
}


def run_entry(name, changes=None, device="cpu", n=2):
    """Run an entry point on its tensors for a batch of n, some of them changed."""
    entry = ENTRIES[name]
    arguments = {key: value.to(device) for key, value in entry.arguments(n).items()}
    for argument, change in (changes or {}).items():
        arguments[argument] = change(arguments[argument])
    return entry.call(arguments, device)


def argument_cases(float_only=False):
    """(entry point, argument) pairs for the arguments each entry point reads
    (floating-point ones only if ``float_only``)."""
    return [
        (name, argument)
        for name, entry in ENTRIES.items()
        for argument in entry.reads
        if not float_only or entry.arguments(1)[argument].dtype.is_floating_point
    ]


def change_all(name, change):
    return {argument: change for argument in ENTRIES[name].reads}


@settings(max_examples=15)
@given(value=NON_FINITE, position=st.integers(0, 99), n=st.integers(1, 3))
@pytest.mark.parametrize("name, argument", argument_cases(float_only=True))
def test_non_finite_value_raises(name, argument, value, position, n, device):
    assert_raises_naming(
        lambda: run_entry(name, {argument: lambda t: with_one_value(t, position, value)}, device, n),
        [argument],
    )


@pytest.mark.parametrize("name", ENTRIES)
def test_empty_batch_raises(name, device):
    empty = change_all(name, lambda t: t[:0])
    assert_raises_naming(lambda: run_entry(name, empty, device), ENTRIES[name].reads)


@pytest.mark.parametrize(
    "name", [n for n, e in ENTRIES.items() if all(t.dim() > 2 for t in e.arguments(1).values())]
)
def test_zero_size_spatial_dimension_raises(name, device):
    no_width = change_all(name, lambda t: t[..., :0])
    assert_raises_naming(lambda: run_entry(name, no_width, device), ENTRIES[name].reads)


@pytest.mark.parametrize("dtype", OTHER_DTYPES, ids=str)
@pytest.mark.parametrize("name, argument", argument_cases())
def test_other_dtype_works_or_raises(name, argument, dtype, device):
    reference = run_entry(name, device=device)
    assert_works_or_names(
        lambda: run_entry(name, {argument: lambda t: t.round().to(dtype)}, device),
        [argument],
        reference,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ENTRIES)
def test_layout_does_not_change_results(name, layout, device):
    reference = run_entry(name, device=device)
    assert_same_results(run_entry(name, change_all(name, LAYOUTS[layout]), device), reference)


@pytest.mark.parametrize(
    "name, argument",
    [(n, a) for n, a in argument_cases() if ENTRIES[n].runs_model or len(ENTRIES[n].reads) > 1],
)
def test_tensor_on_other_device_raises(name, argument, device):
    """Against a model's parameters the moved argument is to blame; between two
    tensors, either."""
    other = other_device(device)
    blamed = [argument] if ENTRIES[name].runs_model else ENTRIES[name].reads
    assert_raises_naming(lambda: run_entry(name, {argument: lambda t: t.to(other)}, device), blamed)


def linear_model() -> torch.nn.Module:
    """Unlike the tanh CNN, its logits overflow on huge inputs."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Dropout(0.25), torch.nn.Linear(2 * SIDE * SIDE, 2)
    ).double().eval()


def huge_values(value, position, everywhere):
    def change(t):
        return torch.full_like(t, value) if everywhere else with_one_value(t, position, value)

    return change


@settings(max_examples=10)
@given(value=HUGE, position=st.integers(0, 99), everywhere=st.booleans())
@pytest.mark.parametrize("make_model", [tiny_dropout_cnn, linear_model], ids=["tanh_cnn", "linear"])
@pytest.mark.parametrize("name", MODEL_ENTRY_POINTS)
def test_model_entry_huge_inputs_work_or_raise(name, make_model, value, position, everywhere, device):
    x, mask, baselines = model_arguments(2, device)
    huge = huge_values(value, position, everywhere)(x)

    def call():
        model = make_model().to(device)
        torch.manual_seed(0)  # expected gradients draws its path points
        return MODEL_ENTRY_POINTS[name].call(model, huge, mask, baselines)

    assert_works_or_names(call, ["inputs"])


@settings(max_examples=20)
@given(value=HUGE, position=st.integers(0, 99), everywhere=st.booleans(), n=st.integers(1, 3))
@pytest.mark.parametrize(
    "name, argument", [(n, a) for n, a in argument_cases(float_only=True) if not ENTRIES[n].runs_model]
)
def test_function_huge_values_give_finite_results(name, argument, value, position, everywhere, n, device):
    call = lambda: run_entry(name, {argument: huge_values(value, position, everywhere)}, device, n)  # noqa: E731
    if name == "predictive_uncertainty":  # probabilities cannot be huge
        assert_raises_naming(call, [argument])
    else:
        assert_finite_results(call(), run_entry(name, device=device, n=n))
