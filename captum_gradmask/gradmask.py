"""GradMask: a training penalty on saliency that falls outside the lesion mask.

Simpson, Dutil, Bengio, Cohen, "GradMask: Reduce Overfitting by Regularizing
Saliency", MIDL 2019. For each example b with a mask:

    s_b  = |z_t - z_c|  (variant "contrast"),  z_t  ("class"),  z_{y_b}  ("target"),
           sum_k log softmax(z_b)_k  ("rrr", Ross et al. 2017)
    a_b  = d s_b / d x_b, times x_b ("input_x_gradient") or times x_b - x'_b at a
           random point of the path x'_b -> x_b ("expected_gradients")
    R_b  = norm((1 - dilate(m_b)) * a_b)
    penalty = mean (or sum) of R_b over the examples that have a mask.

``gradmask_penalty`` is the function, ``GradMask`` the module holding the options.
"""

import contextlib
import warnings
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_gradmask._compat import _format_additional_forward_args
from captum_gradmask._validation import (
    check_finite_results,
    check_float_inputs,
    check_values,
    is_int,
)

VARIANTS = ("contrast", "class", "target", "rrr")
SALIENCIES = ("gradient", "input_x_gradient", "expected_gradients")
NORMS = ("sq_l2", "l2", "l1")
REDUCTIONS = ("mean", "sum")
METHODS = ("exact", "finite_difference")

TargetLike = Union[int, Sequence[int], Tensor]


class GradMaskOutput(NamedTuple):
    """``outputs``: the model outputs at the inputs (reuse them for the task loss);
    ``penalty``: the scalar GradMask penalty, differentiable w.r.t. the parameters."""

    outputs: Tensor
    penalty: Tensor


def gradmask_penalty(
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    mask: Tensor,
    has_mask: Optional[Tensor] = None,
    additional_forward_args: Optional[object] = None,
    *,
    variant: str = "contrast",
    target: Optional[TargetLike] = 1,
    contrast_target: int = 0,
    saliency: str = "gradient",
    norm: str = "sq_l2",
    reduction: str = "mean",
    method: str = "exact",
    dilate: int = 0,
) -> GradMaskOutput:
    r"""Forward ``inputs`` through ``forward_func`` and return its outputs with the
    GradMask penalty on the saliency outside ``mask``.

    Args:
        forward_func (Callable): the model; returns logits of shape (N, C).
        inputs (Tensor): float inputs (N, C_in, *spatial) with 1 to 3 spatial dims.
        mask (Tensor): lesion masks (N, 1 or C_in, *spatial), values in [0, 1]
            (1 = lesion). The penalty weight is 1 - dilate(mask).
        has_mask (Tensor, optional): bool or 0/1 tensor (N,); examples without a mask
            get no penalty. Default: every example has one.
        additional_forward_args (Any, optional): passed to ``forward_func`` after the
            inputs, as in Captum.
        variant (str): "contrast" (s = |z_t - z_c|, paper eq. 2), "class" (s = z_t,
            eq. 1; with a 2-logit head the model can move a confounder into z_c, so
            it warns), "target" (s = z_{y_b}, with ``target`` the labels (N,)), or
            "rrr" (s = sum_k log softmax(z)_k, the summed log probabilities of all
            classes: "Right for the Right Reasons", Ross, Hughes & Doshi-Velez 2017,
            whose loss is norm="sq_l2"; it ignores ``target`` and
            ``contrast_target`` and needs at least 2 logits).
        target (int, list or Tensor): the class t, or per-example labels (N,).
        contrast_target (int): the class c of the "contrast" variant.
        saliency (str): "gradient" (the paper), "input_x_gradient" or
            "expected_gradients" (gradient at one random point between a baseline,
            another example of the batch, and the input, times their difference;
            Erion et al. 2021). Expected gradients also sees confounders the model
            answers with a saturated, flat response, where the local gradient is ~0.
        norm (str): "sq_l2" (sum of squares), "l2" (sqrt(sum of squares + eps), eps
            = finfo(dtype).eps ** 2) or "l1" (sum of absolute values).
        reduction (str): "mean" over the examples that have a mask (0 when none has
            one) or "sum".
        method (str): "exact" differentiates the saliency (double backprop).
            "finite_difference" returns the same penalty value with a parameter
            gradient from a forward difference of the saliency objective along the
            penalty's direction (Finlay & Oberman 2019), reusing the forward pass at
            the inputs: no double backward, so it works with ``torch.compile`` and
            kernels that have no second derivative.
        dilate (int): radius in pixels of a square dilation of the mask before
            weighting (the authors blurred their masks; sigma ~ radius / 4).

    Returns:
        GradMaskOutput(outputs, penalty).

    Dropout: every forward pass of one call replays the same random state, so all
    passes see the same dropout masks. BatchNorm in training mode couples the
    examples of a batch; the saliency is then d(sum_b s_b)/dx_b, as in the authors'
    code, which differs from per-example saliency (a warning says so). Use
    GroupNorm, or BatchNorm in eval mode, for per-example saliency. Running
    statistics are updated once per call, by the forward at the inputs. A call that
    raises (a bad target, the model failing) changes neither them nor the random state.

    Examples::

        >>> outputs, penalty = gradmask_penalty(model, x, lesion_masks)
        >>> loss = F.cross_entropy(outputs, labels) + 10.0 * penalty
        >>> loss.backward()
    """
    _check_options(variant, saliency, norm, reduction, method, dilate)
    if isinstance(inputs, tuple) and len(inputs) != 1:
        raise ValueError(
            f"inputs must be one Tensor (N, C, *spatial), got a tuple of {len(inputs)}; "
            "pass other model inputs through additional_forward_args"
        )
    (inputs,) = check_float_inputs(inputs, forward_func=forward_func)
    if not 3 <= inputs.dim() <= 5:
        raise ValueError(
            "inputs must be one Tensor (N, C, *spatial) with 1 to 3 spatial dims, got "
            f"shape {tuple(inputs.shape)}"
        )
    _check_mask(mask, inputs)
    example_weight = _example_weight(has_mask, inputs)
    _check_not_compiled_for_exact(forward_func, method)
    _warn_on_coupled_batch_norm(forward_func)

    outside_lesion = 1 - _dilate(mask.to(inputs.dtype), dilate)
    extra_args = _format_additional_forward_args(additional_forward_args) or ()
    rng = _ReplayableRandomState(inputs.device)
    with _state_restored_on_error(forward_func, rng):
        return _outputs_and_penalty(
            forward_func, inputs, outside_lesion, example_weight, extra_args, rng,
            variant, target, contrast_target, saliency, norm, reduction, method,
        )


def _outputs_and_penalty(
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    outside_lesion: Tensor,
    example_weight: Tensor,
    extra_args: tuple,
    rng: "_ReplayableRandomState",
    variant: str,
    target: object,
    contrast_target: int,
    saliency: str,
    norm: str,
    reduction: str,
    method: str,
) -> GradMaskOutput:
    """The forward passes and the penalty of ``gradmask_penalty``, arguments checked."""
    leaf = inputs if inputs.requires_grad else inputs.detach().requires_grad_()
    outputs = forward_func(leaf, *extra_args)
    objective = _saliency_objective(outputs, inputs.shape[0], variant, target, contrast_target)
    rng.advance_past_first_pass()

    if saliency == "expected_gradients":
        points, scale = _random_path_points(inputs)
        with rng.replay(), _preserved_buffers(forward_func):
            objective_at_points = objective(forward_func(points, *extra_args))
    else:
        points, objective_at_points = leaf, objective(outputs)
        scale = inputs.detach() if saliency == "input_x_gradient" else None

    def penalty_of(attributions: Tensor) -> Tensor:
        per_example = _norm(outside_lesion * attributions, norm)
        return _reduce(per_example * example_weight, example_weight, reduction)

    if method == "exact":
        (gradient,) = torch.autograd.grad(objective_at_points.sum(), points, create_graph=True)
        penalty = penalty_of(gradient if scale is None else scale * gradient)
        return _finite_output(outputs, penalty)

    objective_sum = objective_at_points.sum()
    (gradient,) = torch.autograd.grad(objective_sum, points, retain_graph=True)
    attributions = (gradient if scale is None else scale * gradient).requires_grad_()
    with torch.enable_grad():
        penalty_value = penalty_of(attributions)
        (penalty_slope,) = torch.autograd.grad(penalty_value, attributions)
    direction = penalty_slope if scale is None else scale * penalty_slope

    def objective_sum_at(shifted_points: Tensor) -> Tensor:
        with rng.replay(), _preserved_buffers(forward_func):
            return objective(forward_func(shifted_points, *extra_args)).sum()

    # The caller's own inputs get the surrogate's input gradient (~ the exact one);
    # a private leaf needs none, and a first layer's input gradient is costly.
    origin = points if points is inputs else points.detach()
    surrogate = _directional_derivative(objective_sum_at, origin, direction, objective_sum)
    # Value of the exact penalty, gradient of the finite-difference surrogate.
    penalty = penalty_value.detach() + (surrogate - surrogate.detach())
    return _finite_output(outputs, penalty)


class GradMask(nn.Module):
    r"""The GradMask penalty as a module holding a model and its options.

    Calling it returns ``GradMaskOutput(outputs, penalty)`` from one forward pass,
    so the task loss reuses the outputs. Options and semantics are those of
    :func:`gradmask_penalty`.

    Examples::

        >>> gradmask = GradMask(model, variant="contrast", norm="sq_l2")
        >>> for x, y, lesion_mask in loader:
        ...     outputs, penalty = gradmask(x, lesion_mask)
        ...     loss = F.cross_entropy(outputs, y) + 10.0 * penalty
        ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        variant: str = "contrast",
        target: Optional[TargetLike] = 1,
        contrast_target: int = 0,
        saliency: str = "gradient",
        norm: str = "sq_l2",
        reduction: str = "mean",
        method: str = "exact",
        dilate: int = 0,
    ) -> None:
        super().__init__()
        _check_options(variant, saliency, norm, reduction, method, dilate)
        _check_not_compiled_for_exact(model, method)
        self.model = model
        self.options = dict(
            variant=variant, target=target, contrast_target=contrast_target,
            saliency=saliency, norm=norm, reduction=reduction, method=method, dilate=dilate,
        )

    def forward(
        self,
        inputs: Tensor,
        mask: Tensor,
        has_mask: Optional[Tensor] = None,
        additional_forward_args: Optional[object] = None,
        target: Optional[TargetLike] = None,
    ) -> GradMaskOutput:
        """``target`` overrides the configured target for this call: per-example
        labels (N,) for the "target" variant."""
        options = dict(self.options)
        if target is not None:
            options["target"] = target
        return gradmask_penalty(
            self.model, inputs, mask, has_mask, additional_forward_args, **options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


# --- the saliency objective ---


def _saliency_objective(
    outputs: Tensor, batch_size: int, variant: str, target: object, contrast_target: int
) -> Callable[[Tensor], Tensor]:
    """Check the outputs and targets once; return outputs -> s (N,)."""
    if not isinstance(outputs, Tensor) or outputs.dim() != 2 or outputs.shape[0] != batch_size:
        raise ValueError(
            "forward_func must return logits of shape (N, C) with N = "
            f"{batch_size}, got {getattr(outputs, 'shape', type(outputs).__name__)}"
        )
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
        warnings.warn(
            "variant='class' on a 2-logit model: penalising the saliency of z_t "
            "alone lets the model move a confounder into the other logit; "
            "variant='contrast' removes it",
            UserWarning,
            stacklevel=3,
        )
    target_index = _target_index(target, batch_size, n_classes, outputs.device, variant)
    rows = torch.arange(batch_size, device=outputs.device)
    if variant != "contrast":
        return lambda logits: logits[rows, target_index]
    if not isinstance(contrast_target, int) or not 0 <= contrast_target < n_classes:
        raise ValueError(
            f"contrast_target must be an int in [0, {n_classes}), got {contrast_target!r}"
        )
    check_values(
        lambda: target_index != contrast_target,
        f"contrast_target must differ from target, both are {contrast_target} "
        "(for an example: its saliency |z_t - z_c| would be 0)",
    )
    return lambda logits: (logits[rows, target_index] - logits[:, contrast_target]).abs()


def _target_index(
    target: object, batch_size: int, n_classes: int, device: torch.device, variant: str
) -> Tensor:
    if variant == "target" and (target is None or isinstance(target, int)):
        raise ValueError(
            "variant='target' needs per-example labels: pass target as a Tensor or "
            f"list of {batch_size} class indices, got {target!r}"
        )
    if is_int(target):
        if not 0 <= target < n_classes:
            raise ValueError(f"target must be in [0, {n_classes}), got {target}")
        return torch.full((batch_size,), target, dtype=torch.long, device=device)
    if isinstance(target, (list, tuple)):
        target = torch.tensor(target, dtype=torch.long, device=device)
    if not isinstance(target, Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target must be an int or integer labels (N,), got {target!r}")
    if target.shape != (batch_size,):
        raise ValueError(
            f"target must have shape ({batch_size},), got {tuple(target.shape)}"
        )
    check_values(lambda: (target >= 0) & (target < n_classes), f"target labels must be in [0, {n_classes})")
    return target.to(device=device, dtype=torch.long)


# --- attributions, norms, reduction ---


def _finite_output(outputs: Tensor, penalty: Tensor) -> GradMaskOutput:
    check_finite_results((outputs, penalty), "the model outputs or the GradMask penalty")
    return GradMaskOutput(outputs, penalty)


def _random_path_points(inputs: Tensor) -> Tuple[Tensor, Tensor]:
    """One point per example on the path from a baseline (another example of the
    batch) to the input, and the input-minus-baseline difference."""
    batch_size = inputs.shape[0]
    x = inputs.detach()
    baselines = x[torch.randperm(batch_size, device=x.device)]
    alphas = torch.rand(batch_size, *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
    points = (baselines + alphas * (x - baselines)).requires_grad_()
    return points, x - baselines


def _norm(weighted: Tensor, norm: str) -> Tensor:
    flat = weighted.flatten(1)
    if norm == "l1":
        return flat.abs().sum(1)
    squares = flat.pow(2).sum(1)
    if norm == "sq_l2":
        return squares
    return (squares + torch.finfo(flat.dtype).eps ** 2).sqrt()


def _reduce(weighted_penalties: Tensor, example_weight: Tensor, reduction: str) -> Tensor:
    total = weighted_penalties.sum()
    if reduction == "sum":
        return total
    return total / example_weight.sum().clamp_min(1)


def _dilate(mask: Tensor, radius: int) -> Tensor:
    if radius == 0:
        return mask
    max_pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[mask.dim() - 3]
    return max_pool(mask, kernel_size=2 * radius + 1, stride=1, padding=radius)


def _directional_derivative(
    objective_sum_at: Callable[[Tensor], Tensor],
    points: Tensor,
    direction: Tensor,
    objective_sum: Tensor,
) -> Tensor:
    """Forward difference of the objective along ``direction``, from its sum
    ``objective_sum`` already computed at ``points`` and one more forward pass: its
    gradient w.r.t. the parameters (and the points) approximates that of
    direction . d(objective)/d(points).

    The step is eps ** (1/2) of the input scale, the balance of truncation
    (O(step)) and rounding (O(eps / step)) error of a one-sided difference; a step
    this small also rarely crosses a ReLU kink, whose jump in the parameter
    gradient the quotient would divide by the step. It is
    taken along the direction scaled to max-norm 1, and the quotient scaled back, so
    a zero or tiny direction (no example has a mask) cannot overflow the step. The
    eps is that of the coarser of the points and the objective: under autocast the
    objective of float32 points is computed, and rounded, in half precision.
    """
    eps = max(torch.finfo(points.dtype).eps, torch.finfo(objective_sum.dtype).eps)
    dtype_step = eps ** (1 / 2)
    step = dtype_step * points.detach().abs().amax().clamp_min(1)
    direction_scale = direction.abs().amax()
    unit_direction = direction / direction_scale.clamp_min(torch.finfo(points.dtype).tiny)
    shifted_value = objective_sum_at(points + step * unit_direction)
    return (shifted_value - objective_sum) / step * direction_scale


# --- dropout, buffers and option checks ---


class _ReplayableRandomState:
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
def _preserved_buffers(forward_func: Callable) -> Iterator[None]:
    """Extra forward passes must not update BatchNorm running statistics twice.

    They run on copies of the buffers and the originals are put back untouched:
    restoring them in place would break the backward of the graphs that saved them
    (BatchNorm saves its running statistics for backward)."""
    if not isinstance(forward_func, nn.Module):
        yield
        return
    originals = [
        (module, name, buffer)
        for module in forward_func.modules()
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
def _state_restored_on_error(forward_func: Callable, rng: _ReplayableRandomState) -> Iterator[None]:
    """A call that fails after the first forward pass (on a target out of range, or
    the model raising) leaves BatchNorm running statistics and the random state as
    they were."""
    saved = [
        (buffer, buffer.clone())
        for module in _training_batch_norms(forward_func)
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


def _training_batch_norms(forward_func: Callable) -> List[nn.Module]:
    if not isinstance(forward_func, nn.Module):
        return []
    return [
        module
        for module in forward_func.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
    ]


def _check_options(variant, saliency, norm, reduction, method, dilate) -> None:
    for name, value, allowed in [
        ("variant", variant, VARIANTS),
        ("saliency", saliency, SALIENCIES),
        ("norm", norm, NORMS),
        ("reduction", reduction, REDUCTIONS),
        ("method", method, METHODS),
    ]:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if not is_int(dilate) or dilate < 0:
        raise ValueError(f"dilate must be an int >= 0, got {dilate!r}")


def _check_mask(mask: object, inputs: Tensor) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a Tensor, got {type(mask).__name__}")
    if not (mask.dtype.is_floating_point or mask.dtype == torch.bool):
        raise TypeError(f"mask must be float or bool, got {mask.dtype}")
    n, channels, *spatial = inputs.shape
    if (
        mask.dim() != inputs.dim()
        or mask.shape[0] != n
        or mask.shape[1] not in (1, channels)
        or list(mask.shape[2:]) != spatial
    ):
        raise ValueError(
            f"mask must have shape ({n}, 1 or {channels}, {', '.join(map(str, spatial))}) "
            f"to match inputs {tuple(inputs.shape)}, got {tuple(mask.shape)}"
        )
    if mask.device != inputs.device:
        raise ValueError(f"mask is on {mask.device} but inputs are on {inputs.device}")
    if mask.dtype != torch.bool:
        check_values(
            lambda: (mask >= 0) & (mask <= 1),
            "mask values must be finite and in [0, 1] (NaN, Inf or out of range found)",
        )


def _example_weight(has_mask: Optional[Tensor], inputs: Tensor) -> Tensor:
    n = inputs.shape[0]
    if has_mask is None:
        return torch.ones(n, device=inputs.device, dtype=inputs.dtype)
    if not isinstance(has_mask, Tensor) or has_mask.shape != (n,):
        raise ValueError(
            f"has_mask must be a Tensor of shape ({n},), got "
            f"{getattr(has_mask, 'shape', type(has_mask).__name__)}"
        )
    if has_mask.device != inputs.device:
        raise ValueError(f"has_mask is on {has_mask.device} but inputs are on {inputs.device}")
    if has_mask.dtype != torch.bool:
        check_values(lambda: (has_mask == 0) | (has_mask == 1), "has_mask must be bool or hold only 0 and 1")
    return has_mask.to(inputs.dtype)


def _check_not_compiled_for_exact(forward_func: Callable, method: str) -> None:
    compiled = isinstance(forward_func, torch._dynamo.eval_frame.OptimizedModule)
    if compiled and method == "exact":
        raise ValueError(
            "method='exact' needs double backward, which torch.compile'd models do not "
            "support; use method='finite_difference'"
        )


def _warn_on_coupled_batch_norm(forward_func: Callable) -> None:
    if _training_batch_norms(forward_func):
        warnings.warn(
            "BatchNorm in training mode couples the examples of a batch: the GradMask "
            "saliency is d(sum_b s_b)/dx_b, not the per-example d s_b/dx_b. Use "
            "GroupNorm or BatchNorm in eval mode for per-example saliency.",
            UserWarning,
            stacklevel=3,
        )
