"""Three ways to get the parameter gradient of a penalty R(g) on the input gradient
g = d S / d points of a summed saliency objective S.

- ``exact``: double backprop, R computed from g taken with ``create_graph``.
- ``forward_mode``: with v = dR/dg held fixed, dR/dtheta = d(v . g)/dtheta, and
  v . g is the directional derivative of S along v, which forward-mode AD gives
  exactly; one backward through that dual forward pass gives the parameter gradient
  (reverse-over-forward). No double backward. PyTorch's own reverse-over-forward is
  wrong or fails for a few operations (normalisation statistics, softmax,
  attention): those run recomposed (``_forward_mode_ops``).
- ``finite_difference``: the directional derivative replaced by a forward
  difference quotient (Finlay & Oberman 2019). Its first-order term v . g is known
  exactly, so each call checks the quotient against it.

Each returns the penalty, the value of R at the exact g with the parameter gradient
of its method, and the model outputs at the points when it computed them with their
graph (forward_mode: its dual pass), else None.
"""

from typing import Callable, List, NamedTuple, Tuple

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor, nn

from captum_gradmask._forward_mode_ops import recomposed_for_forward_mode
from captum_gradmask._validation import values_checked, warn_at_caller

# Relative disagreement of the difference quotient with its exact first-order term
# above which the quotient is lost to rounding or to many activation kinks. It cannot
# tell every failure (benchmarks/accuracy_gradmask_methods.py, float32): up to 8e-3
# on smooth nets whose parameter gradient is right to 1e-2, but 3e-4 to 2e-2 on
# ReLU / BatchNorm nets whose parameter gradient is off by 1.5x to 30x: one kink
# crossed moves the quotient by O(1) but its parameter gradient by O(1/step).
# Hence also the static check, warn_if_finite_difference_is_inexact.
QUOTIENT_TOLERANCE = 1e-2

# Layers whose derivative jumps: a float32 step (3e-4 of the input scale) crosses
# their kinks, and each crossing adds O(1/step) to the quotient's parameter gradient.
PIECEWISE_LINEAR_LAYERS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)


class SaliencyProblem(NamedTuple):
    """``objective_sum_at(points)``: S and the model outputs at other points, by a
    forward pass that replays the first pass's random state and buffers.
    ``points``: where g is taken. ``objective_sum``: S at ``points``, with its graph.
    ``penalty_of``: g -> R. ``track_points``: whether the points are the caller's
    inputs, whose own gradient the penalty should carry."""

    objective_sum_at: Callable[[Tensor], Tuple[Tensor, Tensor]]
    points: Tensor
    objective_sum: Tensor
    penalty_of: Callable[[Tensor], Tensor]
    track_points: bool


def exact_penalty(problem: SaliencyProblem) -> Tuple[Tensor, None]:
    (gradient,) = torch.autograd.grad(problem.objective_sum, problem.points, create_graph=True)
    penalty = problem.penalty_of(gradient)
    _check_double_backward_exists(penalty)
    return penalty, None


def forward_mode_penalty(problem: SaliencyProblem) -> Tuple[Tensor, Tensor]:
    # The dual pass also gives the outputs at the points, with their graph: the first
    # pass's graph need not be kept (a fifth less peak memory).
    value, direction, _ = _value_and_direction(problem, keep_graph=False)
    origin = problem.points if problem.track_points else problem.points.detach()
    # The tangent is linear in the direction: propagate it at max-norm 1 and scale
    # back. A small direction would otherwise carry subnormal numbers through the
    # network, which the CPU computes up to 100 times slower.
    direction_scale = direction.abs().amax()
    unit_direction = direction / direction_scale.clamp_min(torch.finfo(direction.dtype).tiny)
    try:
        with recomposed_for_forward_mode(), forward_ad.dual_level():
            dual_points = forward_ad.make_dual(origin, unit_direction)
            objective_sum, outputs = problem.objective_sum_at(dual_points)
            tangent = forward_ad.unpack_dual(objective_sum).tangent
            outputs = forward_ad.unpack_dual(outputs).primal
    except NotImplementedError as error:
        if str(error).startswith("method='forward_mode'"):  # our own refusal says it all
            raise
        raise NotImplementedError(
            "method='forward_mode' needs forward-mode derivatives of every operation "
            f"in the model, and one is missing ({_first_line(error)}). Use "
            "method='exact', or method='finite_difference' for compiled models and "
            "kernels with neither"
        ) from error
    if tangent is None:  # the objective does not depend on the points
        return value, outputs
    if _has_underivable_node(tangent):
        raise NotImplementedError(
            "method='forward_mode' needs the backward of every operation's tangent, and "
            "one in this model has none (e.g. GLU, hardsigmoid). Use method='exact', or "
            "method='finite_difference' for compiled models"
        )
    tangent = tangent * direction_scale
    return value + (tangent - tangent.detach()), outputs


def finite_difference_penalty(problem: SaliencyProblem) -> Tuple[Tensor, None]:
    value, direction, gradient = _value_and_direction(problem, keep_graph=True)
    origin = problem.points if problem.track_points else problem.points.detach()
    quotient, first_order = _difference_quotient(problem, origin, direction, gradient)
    if values_checked():
        _warn_if_untrusted(quotient, first_order)
    return value + (quotient - quotient.detach()), None


METHODS = {
    "exact": exact_penalty,
    "forward_mode": forward_mode_penalty,
    "finite_difference": finite_difference_penalty,
}


def warn_if_finite_difference_is_inexact(modules: List[nn.Module], dtype: torch.dtype) -> None:
    """Warn before a finite-difference call on a net with kinks in a dtype whose
    step is wide enough to cross them (float32 and half types)."""
    if torch.finfo(dtype).eps < 1e-10:
        return
    kinked = sorted({
        type(module).__name__
        for module in modules  # a ModulesRun's: every submodule already
        if isinstance(module, PIECEWISE_LINEAR_LAYERS)
    })
    if kinked:
        warn_at_caller(
            f"method='finite_difference' in {dtype} on a network with piecewise-linear "
            f"layers ({', '.join(kinked)}): the difference step crosses their kinks, and "
            "its parameter gradient was measured 1.5 to 30 times off on such CNNs "
            "(benchmarks/accuracy_gradmask_methods.py). Use method='forward_mode' or "
            "method='exact', which are exact."
        )


def _value_and_direction(problem: SaliencyProblem, keep_graph: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """R at the exact g, v = dR/dg, and g. R's graph holds only what R reads
    besides g (a layer saliency's activations), so the directional derivative adds
    the part through g."""
    (gradient,) = torch.autograd.grad(problem.objective_sum, problem.points, retain_graph=keep_graph)
    gradient = gradient.detach()
    probe = gradient.clone().requires_grad_()
    (direction,) = torch.autograd.grad(problem.penalty_of(probe), probe)
    return problem.penalty_of(gradient), direction, gradient


def _difference_quotient(
    problem: SaliencyProblem, origin: Tensor, direction: Tensor, gradient: Tensor
) -> Tuple[Tensor, Tensor]:
    """(S(p + h v) - S(p)) / h, whose parameter gradient approximates that of v . g,
    and its exact first-order term v . g (no graph).

    The step is eps ** (1/2) of the input scale, the balance of truncation (O(h)) and
    rounding (O(eps / h)) error of a one-sided difference. It is taken along v scaled
    to max-norm 1, and the quotient scaled back, so a zero or tiny v (no example has
    a mask) cannot overflow the step. The eps is that of the coarser of the points
    and the objective: under autocast the objective of float32 points is computed,
    and rounded, in half precision.
    """
    points, objective_sum = problem.points, problem.objective_sum
    eps = max(torch.finfo(points.dtype).eps, torch.finfo(objective_sum.dtype).eps)
    step = eps ** (1 / 2) * points.detach().abs().amax().clamp_min(1)
    direction_scale = direction.abs().amax()
    unit_direction = direction / direction_scale.clamp_min(torch.finfo(points.dtype).tiny)
    shifted_value, _ = problem.objective_sum_at(origin + step * unit_direction)
    quotient = (shifted_value - objective_sum) / step * direction_scale
    first_order = (direction * gradient).sum()
    return quotient, first_order


def _warn_if_untrusted(quotient: Tensor, first_order: Tensor) -> None:
    error = (quotient.detach() - first_order).abs()
    scale = first_order.abs().clamp_min(torch.finfo(first_order.dtype).tiny)
    relative_error = float(error / scale)
    if relative_error > QUOTIENT_TOLERANCE and bool(first_order != 0):
        warn_at_caller(
            "method='finite_difference': the difference quotient is off its exact "
            f"first-order term by {relative_error:.1e} relative, so its parameter "
            "gradient cannot be trusted (in float32 on ReLU, max-pool or BatchNorm "
            "nets the step crosses activation kinks). Use method='forward_mode' or "
            "method='exact', which are exact."
        )


def _has_underivable_node(result: Tensor) -> bool:
    """Whether the graph of ``result`` holds a node whose backward cannot run: an
    operation with no derivative of its backward or tangent (flash attention's
    double backward; the backward of some tangents, e.g. of GLU or hardsigmoid), or
    a custom Function marked once_differentiable. PyTorch would raise only in the
    caller's ``backward()``, with a bare error."""
    seen, stack = set(), [result.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in ("NotImplemented", "Error"):  # Error: once_differentiable
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


def _check_double_backward_exists(penalty: Tensor) -> None:
    if _has_underivable_node(penalty):
        raise RuntimeError(
            "method='exact' needs the double backward of every operation, and one in "
            "this model has none: e.g. flash attention (PyTorch's default attention "
            "kernel; run the model inside torch.nn.attention.sdpa_kernel("
            "SDPBackend.MATH)), hardsigmoid, or a custom autograd Function marked "
            "once_differentiable. Use "
            "method='forward_mode' (exact, no double backward; it runs attention as a "
            "composition of elementary operations) or method='finite_difference'"
        )


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
