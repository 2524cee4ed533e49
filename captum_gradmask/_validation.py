"""Checks of public arguments, with errors that name the argument."""

import contextlib
import os
import sys
import warnings
from typing import Callable, Iterator, List, Tuple

import captum
import torch
from torch import Tensor

from captum_gradmask._compat import _format_tensor_into_tuples

IndexTuple = Tuple[int, ...]

_value_checks_enabled = True


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    r"""Turn the checks of tensor *values* on or off inside a ``with`` block.

    Checks of shapes, dtypes and devices always run. Checks of values (NaN or Inf in
    arguments, or in results because the model overflowed; mask values outside
    [0, 1]; class indices out of range) read the tensor, which
    on a GPU makes the host wait for the device. In a trusted training loop, turn
    them off to keep every step free of host-device synchronisation; bad values then
    give NaN or a device-side error instead of a clear ``ValueError``.

    Examples::

        >>> with value_checks(False):
        ...     for x, masks, labels in loader:
        ...         outputs, penalty = gradmask(x, masks)
    """
    global _value_checks_enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous, _value_checks_enabled = _value_checks_enabled, enabled
    try:
        yield
    finally:
        _value_checks_enabled = previous


def values_checked() -> bool:
    """Whether checks that read tensor values run (see ``value_checks``)."""
    return _value_checks_enabled


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_CAPTUM_DIR = os.path.dirname(os.path.abspath(captum.__file__))


def warn_at_caller(message: str) -> None:
    """A ``UserWarning`` attributed to the first frame outside this package, torch
    and Captum, so Python's default filter shows it once per call site of the user's."""
    frame, stacklevel = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        (_PACKAGE_DIR, _TORCH_DIR, _CAPTUM_DIR)
    ):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, UserWarning, stacklevel=stacklevel)


def is_int(value: object) -> bool:
    """An int that is not a bool (``True`` is an int to Python, not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_values(values_ok: Callable[[], Tensor], message: str) -> None:
    """Raise ``ValueError(message)`` unless every element of ``values_ok()`` is true;
    skipped, without computing ``values_ok()``, inside ``value_checks(False)``."""
    if _value_checks_enabled and not bool(values_ok().all()):
        raise ValueError(message)


def check_finite(tensor: Tensor, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` if ``tensor`` holds NaN or Inf."""
    check_values(lambda: torch.isfinite(tensor), f"{name} holds NaN or Inf; expected finite values")


def check_batch_size(batch_size: object, name: str, total: int) -> int:
    """The number of samples per pass from a ``*_batch_size`` argument: ``total``
    for None, else an int >= 1."""
    if batch_size is None:
        return total
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"{name} must be None or an int >= 1, got {batch_size!r}")
    return batch_size


def check_float_inputs(
    inputs: object, name: str = "inputs", forward_func: object = None
) -> Tuple[Tensor, ...]:
    """Return ``inputs`` as a tuple after checking it holds non-empty, finite float
    tensors with one batch size on one device, that of ``forward_func``'s parameters
    if it is a module."""
    if not isinstance(inputs, (Tensor, tuple)):
        raise TypeError(
            f"{name} must be a Tensor or a tuple of Tensors, got {type(inputs).__name__}"
        )
    inputs_tuple = _format_tensor_into_tuples(inputs)
    if len(inputs_tuple) == 0:
        raise ValueError(f"{name} is an empty tuple; expected at least one Tensor")
    for position, tensor in enumerate(inputs_tuple):
        label = name if isinstance(inputs, Tensor) else f"{name}[{position}]"
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{label} must be a Tensor, got {type(tensor).__name__}")
        if not tensor.dtype.is_floating_point:
            raise TypeError(
                f"{label} must have a floating-point dtype to take gradients, "
                f"got {tensor.dtype}"
            )
        if tensor.dim() == 0 or tensor.numel() == 0:
            raise ValueError(
                f"{label} must be a non-empty batch (N, ...) with no zero-size "
                f"dimension, got shape {tuple(tensor.shape)}"
            )
        if tensor.shape[0] != inputs_tuple[0].shape[0]:
            raise ValueError(
                f"{label} has batch size {tensor.shape[0]} but {name}[0] has "
                f"{inputs_tuple[0].shape[0]}; all inputs must share dimension 0"
            )
        if tensor.device != inputs_tuple[0].device:
            raise ValueError(
                f"{label} is on {tensor.device} but {name}[0] is on "
                f"{inputs_tuple[0].device}; put all inputs on one device"
            )
    check_model_device(forward_func, inputs_tuple[0], name)
    for position, tensor in enumerate(inputs_tuple):
        check_finite(tensor, name if isinstance(inputs, Tensor) else f"{name}[{position}]")
    return inputs_tuple


def check_model_device(forward_func: object, tensor: Tensor, name: str = "inputs") -> None:
    """Raise a ``ValueError`` naming ``name`` if ``forward_func`` is a module whose
    (first) parameters are on another device than ``tensor``."""
    if not isinstance(forward_func, torch.nn.Module):
        return
    parameter = next(forward_func.parameters(), None)
    if parameter is not None and parameter.device != tensor.device:
        raise ValueError(
            f"{name} is on {tensor.device} but the model's parameters are on "
            f"{parameter.device}; move the model or the {name} to one device"
        )


def check_baselines(baselines: object, inputs: Tuple[Tensor, ...]) -> None:
    """Check the Tensors in ``baselines`` (a Tensor, or a tuple with an entry per
    input; numbers pass) are floating point, on the device of ``inputs``, finite."""
    entries = baselines if isinstance(baselines, tuple) else (baselines,)
    labelled = [
        (f"baselines[{position}]" if isinstance(baselines, tuple) else "baselines", entry)
        for position, entry in enumerate(entries)
        if isinstance(entry, Tensor)
    ]
    for label, tensor in labelled:
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"{label} must have a floating-point dtype, got {tensor.dtype}")
        if tensor.device != inputs[0].device:
            raise ValueError(
                f"{label} is on {tensor.device} but inputs are on {inputs[0].device}"
            )
    for label, tensor in labelled:
        check_finite(tensor, label)


def check_finite_results(results: Tuple[Tensor, ...], name: str) -> None:
    """Raise a ``ValueError`` if results computed from finite inputs hold NaN or Inf:
    the model overflowed, e.g. on inputs of huge magnitude."""
    for result in results:
        check_values(
            lambda: torch.isfinite(result),
            f"NaN or Inf in {name} although the inputs are finite: the model's outputs "
            "or gradients overflowed (inputs of huge magnitude, or diverged weights)",
        )


def _as_index_tuple(value: object, name: str) -> IndexTuple:
    if is_int(value):
        return (value,)
    if isinstance(value, tuple) and all(is_int(v) for v in value):
        return value
    raise TypeError(
        f"{name} entries must be ints or tuples of ints, got {value!r}"
    )


def per_example_targets(target: object, batch_size: int, name: str) -> List[IndexTuple]:
    """Turn a target in any form Captum accepts into one index tuple per example.

    Forms: an int or a tuple (the same output index for every example), a
    one-element integer Tensor, or a list / 1-D integer Tensor with one entry per
    example.
    """
    if target is None:
        raise ValueError(f"{name} must be given; got None")
    if isinstance(target, Tensor):
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer Tensor, got {target.dtype}")
        if target.numel() == 1:
            target = int(target.reshape(()))
        elif target.dim() == 1:
            target = target.tolist()
        else:
            raise ValueError(
                f"{name} as a Tensor must be 1-D with one entry per example, got "
                f"shape {tuple(target.shape)}"
            )
    if isinstance(target, list):
        if len(target) != batch_size:
            raise ValueError(
                f"{name} has {len(target)} entries but inputs have {batch_size} "
                "examples; give one entry per example or a single int/tuple"
            )
        return [_as_index_tuple(entry, name) for entry in target]
    return [_as_index_tuple(target, name)] * batch_size


def check_targets_in_range(
    targets: List[IndexTuple], output_shape: torch.Size, name: str
) -> None:
    """Check every index tuple addresses one element of an output of ``output_shape``
    (batch dimension first)."""
    per_example_shape = tuple(output_shape[1:])
    for index in targets:
        if len(index) != len(per_example_shape) or not all(
            -size <= i < size for i, size in zip(index, per_example_shape)
        ):
            raise ValueError(
                f"{name} {index if len(index) > 1 else index[0]} is out of range for "
                f"the model output of shape {tuple(output_shape)}; expected "
                f"{len(per_example_shape)} indices with -size <= index < size for the sizes "
                f"{per_example_shape}"
            )


def check_target_in_range(target: object, output_shape: Tuple[int, ...], name: str = "target") -> None:
    """Raise a ``ValueError`` naming ``name`` if ``target``, in any form Captum accepts,
    selects no element of a model output of ``output_shape`` (N, ...), where Captum
    would raise an IndexError from deep inside. A Tensor target indexes dimension 1;
    its values are read by ``check_values``."""
    if target is None:
        return
    if not isinstance(target, Tensor):
        targets = per_example_targets(target, output_shape[0], name)
        check_targets_in_range(targets, torch.Size(output_shape), name)
        return
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer Tensor, got {target.dtype}")
    if len(output_shape) < 2:
        raise ValueError(
            f"{name} selects along dimension 1, but the model output has shape "
            f"{tuple(output_shape)}; pass target=None"
        )
    n_classes = output_shape[1]
    check_values(
        lambda: (target >= -n_classes) & (target < n_classes),
        f"{name} holds indices outside [-{n_classes}, {n_classes}) for the model output of shape "
        f"{tuple(output_shape)}",
    )


def select_targets(output: Tensor, targets: List[IndexTuple]) -> Tensor:
    """Pick ``output[b, *targets[b]]`` for every example b, as a 1-D tensor."""
    index = torch.tensor(targets, device=output.device, dtype=torch.long)
    rows = torch.arange(output.shape[0], device=output.device)
    return output[(rows, *index.unbind(dim=1))]
