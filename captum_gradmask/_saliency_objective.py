"""The pieces of the GradMask penalty that do not depend on how it is differentiated:
the saliency objective s_b of each variant, the expected-gradients path points, the
mask dilation, the norms and the reduction over examples."""

import numbers
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_gradmask._validation import check_values, is_int, warn_at_caller

BaselinesLike = Union[None, int, float, Tensor]


# --- the saliency objective s_b ---


def saliency_objective(
    outputs: object, batch_size: int, variant: str, target: object, contrast_target: int
) -> Callable[[Tensor], Tensor]:
    """Check the outputs and targets once; return logits -> s (N,)."""
    _check_logits(outputs, batch_size)
    n_classes = outputs.shape[1]
    if variant == "rrr":
        if n_classes < 2:
            raise ValueError(
                "variant='rrr' needs at least 2 logits, the model returns 1: the log "
                "softmax of a single logit is constant 0"
            )
        return lambda logits: logits.log_softmax(1).sum(1)
    if variant == "contrast" and n_classes < 2:
        raise ValueError(
            "variant='contrast' needs at least 2 logits, the model returns 1; "
            "use variant='class' with target=0"
        )
    if variant == "class" and n_classes == 2:
        warn_at_caller(
            "variant='class' on a 2-logit model: penalising the saliency of z_t "
            "alone lets the model move a confounder into the other logit; "
            "variant='contrast' removes it"
        )
    target_index = _target_index(target, batch_size, n_classes, outputs.device, variant)
    rows = torch.arange(batch_size, device=outputs.device)
    if variant != "contrast":
        return lambda logits: logits[rows, target_index]
    if not is_int(contrast_target) or not 0 <= contrast_target < n_classes:
        raise ValueError(
            f"contrast_target must be an int in [0, {n_classes}), got {contrast_target!r}"
        )
    check_values(
        lambda: target_index != contrast_target,
        f"contrast_target must differ from target, both are {contrast_target} "
        "(for an example: its saliency |z_t - z_c| would be 0)",
    )
    return lambda logits: (logits[rows, target_index] - logits[:, contrast_target]).abs()


def _check_logits(outputs: object, batch_size: int) -> None:
    if isinstance(outputs, (tuple, list)):
        raise TypeError(
            f"forward_func returned a {type(outputs).__name__} of {len(outputs)}; GradMask "
            "needs one logits Tensor (N, C). Wrap the model to pick it, e.g. "
            "gradmask_penalty(lambda x: model(x)[0], ...)"
        )
    if not isinstance(outputs, Tensor) or outputs.dim() != 2 or outputs.shape[0] != batch_size:
        raise ValueError(
            "forward_func must return logits of shape (N, C) with N = "
            f"{batch_size}, got {getattr(outputs, 'shape', type(outputs).__name__)}; "
            "for a segmentation network, wrap it to reduce its maps to (N, C) logits"
        )


def _target_index(
    target: object, batch_size: int, n_classes: int, device: torch.device, variant: str
) -> Tensor:
    if variant == "target" and (target is None or isinstance(target, numbers.Integral)):
        raise ValueError(
            "variant='target' needs per-example labels: pass target as a Tensor or "
            f"list of {batch_size} class indices, got {target!r}"
        )
    if isinstance(target, Tensor) and target.dim() == 0 and not target.dtype.is_floating_point:
        target = int(target)  # one class for every example, as Captum takes it
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        if not 0 <= target < n_classes:
            raise ValueError(f"target must be in [0, {n_classes}), got {target}")
        return torch.full((batch_size,), int(target), dtype=torch.long, device=device)
    if isinstance(target, (list, tuple)):
        target = torch.tensor(target, device=device)  # floats stay floats, and are refused
    if not isinstance(target, Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target must be an int or integer labels (N,), got {target!r}")
    if target.shape != (batch_size,):
        raise ValueError(f"target must have shape ({batch_size},), got {tuple(target.shape)}")
    check_values(
        lambda: (target >= 0) & (target < n_classes), f"target labels must be in [0, {n_classes})"
    )
    return target.to(device=device, dtype=torch.long)


# --- expected gradients: references and path points ---


def check_baselines(baselines: BaselinesLike, inputs: Tensor) -> None:
    """``baselines`` is None, a number, a Tensor broadcastable to the inputs with
    batch dimension 1 (or none), or reference images (M, C, *spatial)."""
    if baselines is None or (isinstance(baselines, (int, float)) and not isinstance(baselines, bool)):
        return
    if not isinstance(baselines, Tensor):
        raise TypeError(
            f"baselines must be None, a number or a Tensor, got {type(baselines).__name__}"
        )
    if baselines.dtype != inputs.dtype:
        raise TypeError(f"baselines must have the inputs' dtype {inputs.dtype}, got {baselines.dtype}")
    if baselines.device != inputs.device:
        raise ValueError(f"baselines is on {baselines.device} but inputs are on {inputs.device}")
    per_example_shape = tuple(inputs.shape[1:])
    is_pool = baselines.dim() == inputs.dim() and tuple(baselines.shape[1:]) == per_example_shape
    broadcasts = baselines.dim() < inputs.dim() or baselines.shape[0] == 1
    if baselines.numel() == 0 or not (is_pool or (broadcasts and _broadcasts_to(baselines, inputs))):
        raise ValueError(
            "baselines must broadcast to the inputs with a batch dimension of 1 (shape "
            f"(1, {', '.join(map(str, per_example_shape))}) or fewer dims), or be reference "
            f"images (M, {', '.join(map(str, per_example_shape))}); got {tuple(baselines.shape)}"
        )
    if _memory_overlaps(baselines, inputs):
        raise ValueError(
            "baselines shares memory with the inputs: drawn from the batch itself, an "
            "example's reference can be the example (a zero penalty). Pass other "
            "reference images, e.g. healthy scans, or leave baselines=None"
        )
    check_values(lambda: torch.isfinite(baselines), "baselines holds NaN or Inf; expected finite values")


def _memory_overlaps(first: Tensor, second: Tensor) -> bool:
    """Whether the two tensors' elements lie in overlapping memory (two slices of
    one big tensor may share storage without sharing elements)."""

    def extent(tensor: Tensor) -> Tuple[int, int]:
        last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
        return tensor.data_ptr(), tensor.data_ptr() + (last + 1) * tensor.element_size()

    (first_start, first_end), (second_start, second_end) = extent(first), extent(second)
    has_memory = first_start != 0 and second_start != 0  # meta tensors have none
    return has_memory and first_start < second_end and second_start < first_end


def _broadcasts_to(tensor: Tensor, inputs: Tensor) -> bool:
    try:
        return torch.broadcast_shapes(tensor.shape, inputs.shape) == inputs.shape
    except RuntimeError:
        return False


def reference_inputs(inputs: Tensor, baselines: BaselinesLike, lesion_region: Tensor) -> Tensor:
    """One reference x'_b per example, never the example itself.

    None: x inside the (dilated) lesion and 0 outside it, so the path changes only
    what the penalty looks at. A number or a broadcastable Tensor: that reference
    for every example. Reference images (M, C, *spatial), M > 1: one drawn per
    example from the global random state.
    """
    if baselines is None:
        return inputs * lesion_region
    if not isinstance(baselines, Tensor):
        return torch.full_like(inputs, baselines)
    if baselines.dim() == inputs.dim() and baselines.shape[0] > 1:
        drawn = torch.randint(baselines.shape[0], (inputs.shape[0],), device=inputs.device)
        return baselines[drawn]
    return baselines.expand_as(inputs)


def path_points(inputs: Tensor, references: Tensor) -> Tuple[Tensor, Tensor]:
    """One point per example at a uniform random position on the path from its
    reference to the input, and the input-minus-reference difference."""
    shape = (inputs.shape[0],) + (1,) * (inputs.dim() - 1)
    alphas = torch.rand(shape, device=inputs.device, dtype=inputs.dtype)
    points = (references + alphas * (inputs - references)).requires_grad_()
    return points, inputs - references


# --- masks, norms, reduction ---


def dilate(mask: Tensor, radius: int) -> Tensor:
    """Square dilation of radius ``radius`` (a max over the (2r+1)^d window)."""
    if radius == 0:
        return mask
    max_pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[mask.dim() - 3]
    return max_pool(mask, kernel_size=2 * radius + 1, stride=1, padding=radius)


def per_example_norm(weighted: Tensor, norm: str) -> Tensor:
    flat = weighted.flatten(1)
    if norm == "l1":
        return flat.abs().sum(1)
    squares = flat.pow(2).sum(1)
    if norm == "sq_l2":
        return squares
    return (squares + torch.finfo(flat.dtype).eps ** 2).sqrt()


def reduce_examples(per_example: Tensor, example_weight: Tensor, reduction: str) -> Tensor:
    total = (per_example * example_weight).sum()
    if reduction == "sum":
        return total
    return total / example_weight.sum().clamp_min(1)


def penalty_function(
    outside_lesion: Tensor,
    attribution_of: Callable[[Tensor], Tensor],
    example_weight: Tensor,
    norm: str,
    reduction: str,
) -> Callable[[Tensor], Tensor]:
    """gradient d(sum_b s_b)/d(points) -> the scalar penalty on the attribution map
    ``attribution_of(gradient)`` (input-sized) outside the lesion."""

    def penalty_of(gradient: Tensor) -> Tensor:
        per_example = per_example_norm(outside_lesion * attribution_of(gradient), norm)
        return reduce_examples(per_example, example_weight, reduction)

    return penalty_of
