"""GradMask: a training penalty on saliency that falls outside the lesion mask.

Simpson, Dutil, Bengio, Cohen, "GradMask: Reduce Overfitting by Regularizing
Saliency", MIDL 2019. For each example b with a mask:

    s_b  = |z_t - z_c|  (variant "contrast"),  z_t  ("class"),  z_{y_b}  ("target"),
           sum_k log softmax(z_b)_k  ("rrr", Ross et al. 2017)
    a_b  = d s_b / d x_b, times x_b ("input_x_gradient") or times x_b - x'_b at a
           random point of the path x'_b -> x_b ("expected_gradients"); or a map at
           a layer with output A_b, upsampled to the input: sum_k dS/dA_bk * A_bk
           ("layer_gradient_x_activation") or sum_k mean(dS/dA_bk) * A_bk
           ("layer_grad_cam"), whose double backward stops at the layer
    R_b  = norm((1 - dilate(m_b)) * a_b)
    penalty = mean (or sum) of R_b over the examples that have a mask.

``gradmask_penalty`` is the function, ``GradMask`` the module holding the options;
``GradMaskOptions`` is the one list of options both take.
"""

import contextlib
import dataclasses
import inspect
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from captum_gradmask._compat import _format_additional_forward_args
from captum_gradmask._directional import (
    METHODS,
    SaliencyProblem,
    warn_if_finite_difference_is_inexact,
)
from captum_gradmask._layer_saliency import (
    LAYER_SALIENCIES,
    LayerTap,
    check_layer_in_model,
    layer_map_function,
)
from captum_gradmask._saliency_objective import (
    BaselinesLike,
    check_baselines,
    dilate,
    path_points,
    penalty_function,
    reference_inputs,
    saliency_objective,
)
from captum_gradmask._state import (
    ModulesRun,
    ReplayableRandomState,
    forward_hooks,
    initial_buffers_in_place,
    state_restored_on_error,
    training_batch_norms,
)
from captum_gradmask._validation import (
    check_finite_results,
    check_float_inputs,
    check_values,
    is_int,
    warn_at_caller,
)

VARIANTS = ("contrast", "class", "target", "rrr")
SALIENCIES = ("gradient", "input_x_gradient", "expected_gradients", *LAYER_SALIENCIES)
NORMS = ("sq_l2", "l2", "l1")
REDUCTIONS = ("mean", "sum")

TargetLike = Union[int, Sequence[int], Tensor]

OPTIONS_DOC = """
        variant (str): "contrast" (s = |z_t - z_c|, paper eq. 2), "class" (s = z_t,
            eq. 1; with a 2-logit head the model can move a confounder into z_c, so
            it warns), "target" (s = z_{y_b}, with ``target`` the labels (N,)), or
            "rrr" (s = sum_k log softmax(z)_k: "Right for the Right Reasons", Ross,
            Hughes & Doshi-Velez 2017, whose loss is norm="sq_l2"; it ignores
            ``target`` and ``contrast_target`` and needs at least 2 logits).
        target (int, list or Tensor): the class t, or per-example labels (N,).
        contrast_target (int): the class c of the "contrast" variant.
        saliency (str): "gradient" (the paper), "input_x_gradient" or
            "expected_gradients" (the gradient at one uniform random point on the
            path from a reference x' to the input, times x - x'; Erion et al. 2021).
            Expected gradients also sees confounders the model answers with a
            saturated, flat response, where the local gradient is ~0. At a layer
            (``layer=``), so that the double backward stops there (cheaper on
            volumes): "layer_gradient_x_activation" (sum over channels of
            dS/dA * A, A the layer's output) or "layer_grad_cam" (sum over
            channels of mean_spatial(dS/dA) * A: Grad-CAM without its ReLU); the
            map is upsampled (bi/trilinearly) to the input and penalised outside
            the lesion (any input channel's). With them "exact" is the cheapest
            method: "forward_mode" and "finite_difference" run the forward again.
        norm (str): "sq_l2" (sum of squares: the authors' 2018-19 code), "l2"
            (sqrt(sum of squares + eps^2): the paper's eqs. 1-2) or "l1" (sum of
            absolute values: the authors' final code).
        reduction (str): "mean" over the examples that have a mask (0 when none has
            one) or "sum".
        method (str): how the parameter gradient is taken; the penalty value is
            the same. "exact": double backprop. "forward_mode": forward-mode AD of
            the saliency along the penalty's direction, then one backward; exact to
            rounding, no double backward. "finite_difference": a difference
            quotient in place of forward-mode AD (Finlay & Oberman 2019): runs
            ``torch.compile``d models and kernels with neither a double backward nor
            forward-mode derivatives (flash attention), but in float32 on ReLU,
            max-pool or BatchNorm nets its gradient can be far off; it checks
            itself on every call and warns when it is.
        dilate (int): radius in pixels of a square dilation of the mask before
            weighting (the authors blurred their masks; sigma ~ radius / 4).
        baselines (None, number or Tensor): the references x' of
            "expected_gradients". None (default): x inside its dilated mask and 0
            outside, so only what the penalty looks at changes along the path. A
            number, or a Tensor broadcastable to the inputs with batch dimension 1:
            that reference for every example. Reference images (M, C, *spatial),
            M > 1 (e.g. healthy scans): one drawn per example. Never the example
            itself, so it works at batch size 1.
        layer (nn.Module): the module of the model whose output (N, K, *spatial)
            the layer saliencies read; it must run once per forward pass."""


@dataclasses.dataclass(frozen=True, eq=False)
class GradMaskOptions:
    """The options of ``gradmask_penalty`` and ``GradMask``, checked when built.

    Args:
{options}

    Examples::

        >>> options = GradMaskOptions(norm="l1", dilate=2)
        >>> options.replace(method="forward_mode").method
        'forward_mode'
    """

    variant: str = "contrast"
    target: Optional[TargetLike] = 1
    contrast_target: int = 0
    saliency: str = "gradient"
    norm: str = "sq_l2"
    reduction: str = "mean"
    method: str = "exact"
    dilate: int = 0
    baselines: BaselinesLike = None
    layer: Optional[nn.Module] = None

    @classmethod
    def from_keywords(cls, options: dict) -> "GradMaskOptions":
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"unknown GradMask option {unknown[0]!r}; options are {names}")
        return cls(**options)

    def __post_init__(self) -> None:
        for name, allowed in [
            ("variant", VARIANTS),
            ("saliency", SALIENCIES),
            ("norm", NORMS),
            ("reduction", REDUCTIONS),
            ("method", tuple(METHODS)),
        ]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not is_int(self.dilate) or self.dilate < 0:
            raise ValueError(f"dilate must be an int >= 0, got {self.dilate!r}")
        if self.saliency in LAYER_SALIENCIES and not isinstance(self.layer, nn.Module):
            raise TypeError(
                f"saliency={self.saliency!r} needs layer=, a module of the model (e.g. "
                f"its last convolutional block), got {self.layer!r}"
            )
        if self.layer is not None and self.saliency not in LAYER_SALIENCIES:
            raise ValueError(
                f"layer is the layer of saliency {' or '.join(map(repr, LAYER_SALIENCIES))}; "
                f"got saliency={self.saliency!r}"
            )
        if self.baselines is not None and self.saliency != "expected_gradients":
            raise ValueError(
                "baselines are the references of saliency='expected_gradients'; got "
                f"saliency={self.saliency!r}"
            )

    def replace(self, **changes: object) -> "GradMaskOptions":
        return dataclasses.replace(self, **changes)


def _with_options_in_signature(func: Callable) -> Callable:
    """Show the options as keyword arguments in ``help()`` and ``inspect``."""
    signature = inspect.signature(func)
    kept = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
    options = [
        inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default)
        for field in dataclasses.fields(GradMaskOptions)
    ]
    func.__signature__ = signature.replace(parameters=kept + options)
    if func.__doc__:
        func.__doc__ = func.__doc__.replace("{options}", OPTIONS_DOC.strip("\n"))
    return func


class GradMaskOutput(NamedTuple):
    """``outputs``: the model outputs at the inputs (reuse them for the task loss);
    ``penalty``: the scalar GradMask penalty, differentiable w.r.t. the parameters."""

    outputs: Tensor
    penalty: Tensor


@_with_options_in_signature
def gradmask_penalty(
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    mask: Tensor,
    has_mask: Optional[Tensor] = None,
    additional_forward_args: Optional[object] = None,
    **options: object,
) -> GradMaskOutput:
    r"""Forward ``inputs`` through ``forward_func`` and return its outputs with the
    GradMask penalty on the saliency outside ``mask``.

    Args:
        forward_func (Callable): the model, or any function of the inputs (a lambda
            around a model too); returns logits of shape (N, C).
        inputs (Tensor): float inputs (N, C_in, *spatial) with 1 to 3 spatial dims.
        mask (Tensor): lesion masks (N, 1 or C_in, *spatial): bool, integer 0/1, or
            float in [0, 1] (1 = lesion). The penalty weight is 1 - dilate(mask).
        has_mask (Tensor, optional): bool or 0/1 tensor (N,); examples without a mask
            get no penalty. Default: every example has one.
        additional_forward_args (Any, optional): passed to ``forward_func`` after the
            inputs, as in Captum.
{options}

    Returns:
        GradMaskOutput(outputs, penalty). Under ``torch.no_grad()`` (a validation
        loop) both are computed all the same and returned without a graph.

    Dropout: every forward pass of one call replays the same random state, so all
    passes see the same dropout masks. BatchNorm in training mode couples the
    examples of a batch; the saliency is then d(sum_b s_b)/dx_b, as in the authors'
    code, which differs from per-example saliency (a warning says so). Use
    GroupNorm, or BatchNorm in eval mode, for per-example saliency. Running
    statistics are updated once per call, by the forward at the inputs. A call that
    raises changes neither them nor the random state. A function that is not a
    module gets the same handling for the modules it runs.

    Examples::

        >>> outputs, penalty = gradmask_penalty(model, x, lesion_masks)
        >>> loss = F.cross_entropy(outputs, labels) + 10.0 * penalty
        >>> loss.backward()
    """
    options = GradMaskOptions.from_keywords(options)
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
    check_baselines(options.baselines, inputs)
    if options.layer is not None:
        check_layer_in_model(options.layer, forward_func)
    _check_method_runs_compiled_models([forward_func], options.method)

    lesion_region = dilate(mask.to(inputs.dtype), options.dilate)
    extra_args = _format_additional_forward_args(additional_forward_args) or ()
    rng, run = ReplayableRandomState(inputs.device), ModulesRun()
    grad_was_enabled = torch.is_grad_enabled()
    with torch.enable_grad(), state_restored_on_error(run, rng):
        outputs, penalty = _outputs_and_penalty(
            forward_func, run, inputs, lesion_region, example_weight, extra_args, rng, options
        )
    check_finite_results((outputs, penalty), "the model outputs or the GradMask penalty")
    if not grad_was_enabled:
        return GradMaskOutput(outputs.detach(), penalty.detach())
    return GradMaskOutput(outputs, penalty)


def _outputs_and_penalty(
    forward_func: Callable[..., Tensor],
    run: ModulesRun,
    inputs: Tensor,
    lesion_region: Tensor,
    example_weight: Tensor,
    extra_args: tuple,
    rng: ReplayableRandomState,
    options: GradMaskOptions,
) -> GradMaskOutput:
    """The forward passes and the penalty of ``gradmask_penalty``, arguments checked."""
    tap = LayerTap(options.layer) if options.layer is not None else None
    # A layer saliency needs no input gradient: its backward stops at the first layer
    # that trains (a third of a 3-D ResNet's backward is the first convolution's).
    leaf = inputs if inputs.requires_grad or tap else inputs.detach().requires_grad_()
    with forward_hooks([(tap.layer, tap.hook)] if tap else []):
        with run.recording(forward_func):
            outputs = forward_func(leaf, *extra_args)
        _check_method_runs_compiled_models(run.modules, options.method)
        _warn_on_coupled_batch_norm(run.modules, inputs.shape[0])
        if options.method == "finite_difference":
            warn_if_finite_difference_is_inexact(run.modules, inputs.dtype)
        objective = saliency_objective(
            outputs, inputs.shape[0], options.variant, options.target, options.contrast_target
        )
        rng.advance_past_first_pass()

        def objective_sum_at(points: Tensor) -> Tuple[Tensor, Tensor]:
            """S and the outputs with ``points`` as the inputs, or in place of the
            layer's output."""
            substitution = tap.substituting(points) if tap else contextlib.nullcontext()
            with rng.replay(), initial_buffers_in_place(run), substitution:
                outputs_at_points = forward_func(inputs.detach() if tap else points, *extra_args)
            return objective(outputs_at_points).sum(), outputs_at_points

        outside_lesion = 1 - lesion_region
        if tap:  # the layer's output stands for the points
            points, objective_sum = tap.activation(inputs), objective(outputs).sum()
            attribution_of = layer_map_function(options.saliency, points, inputs.shape[2:])
            outside_lesion = 1 - lesion_region.amax(1, keepdim=True)
        elif options.saliency == "expected_gradients":
            references = reference_inputs(inputs.detach(), options.baselines, lesion_region)
            points, difference = path_points(inputs.detach(), references)
            objective_sum, _ = objective_sum_at(points)
            attribution_of = difference.mul
        else:
            points, objective_sum = leaf, objective(outputs).sum()
            attribution_of = inputs.detach().mul if options.saliency == "input_x_gradient" else _identity

        penalty_of = penalty_function(outside_lesion, attribution_of, example_weight, options.norm, options.reduction)
        track_points = tap is not None or points is inputs
        problem = SaliencyProblem(objective_sum_at, points, objective_sum, penalty_of, track_points)
        penalty, outputs_at_points = METHODS[options.method](problem)
    if outputs_at_points is not None and options.saliency != "expected_gradients":
        outputs = outputs_at_points  # the same outputs, a newer graph
    return GradMaskOutput(outputs, penalty)


def _identity(gradient: Tensor) -> Tensor:
    return gradient


class GradMask(nn.Module):
    r"""The GradMask penalty as a module holding a model and its options.

    Calling it returns ``GradMaskOutput(outputs, penalty)`` from one forward pass,
    so the task loss reuses the outputs; the semantics are those of
    :func:`gradmask_penalty`.

    Args:
        model (nn.Module or callable): the classifier; returns logits (N, C).
{options}

    Examples::

        >>> gradmask = GradMask(model, variant="contrast", norm="l1", dilate=2)
        >>> for x, y, lesion_mask in loader:
        ...     outputs, penalty = gradmask(x, lesion_mask, has_mask=y == 1)
        ...     loss = F.cross_entropy(outputs, y) + 10.0 * penalty
        ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
    """

    @_with_options_in_signature
    def __init__(self, model: nn.Module, **options: object) -> None:
        """Arguments: see the class docstring."""
        super().__init__()
        self.options = GradMaskOptions.from_keywords(options)
        _check_method_runs_compiled_models([model], self.options.method)
        if self.options.layer is not None:
            check_layer_in_model(self.options.layer, model)
        self.model = model

    def forward(
        self,
        inputs: Tensor,
        mask: Tensor,
        has_mask: Optional[Tensor] = None,
        additional_forward_args: Optional[object] = None,
        target: Optional[TargetLike] = None,
    ) -> GradMaskOutput:
        """The model's outputs at ``inputs`` and the penalty, as
        :func:`gradmask_penalty` with this module's options.

        Args:
            inputs (Tensor): float inputs (N, C_in, *spatial), 1 to 3 spatial dims.
            mask (Tensor): lesion masks (N, 1 or C_in, *spatial), bool, 0/1 or
                float in [0, 1] (1 = lesion).
            has_mask (Tensor, optional): bool or 0/1 (N,); examples without a mask
                get no penalty. Default: every example has one.
            additional_forward_args (Any, optional): passed to the model after the
                inputs, as in Captum.
            target (int, list or Tensor, optional): overrides the configured target
                for this call, e.g. per-example labels (N,) for the "target" variant.
        """
        options = self.options if target is None else self.options.replace(target=target)
        return gradmask_penalty(
            self.model, inputs, mask, has_mask, additional_forward_args,
            **{field.name: getattr(options, field.name) for field in dataclasses.fields(options)},
        )

    def extra_repr(self) -> str:
        layer_names = {module: name for name, module in self.model.named_modules()}
        return ", ".join(
            f"layer={layer_names[self.options.layer]!r}" if field.name == "layer" and self.options.layer is not None
            else f"{field.name}={getattr(self.options, field.name)!r}"
            for field in dataclasses.fields(self.options)
        )


for _documented in (GradMask, GradMaskOptions):
    _documented.__doc__ = _documented.__doc__.replace("{options}", OPTIONS_DOC.strip("\n"))


# --- argument checks ---


def _check_mask(mask: object, inputs: Tensor) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be bool, integer 0/1 or float in [0, 1], got {mask.dtype}")
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
    if mask.dtype.is_floating_point:
        check_values(
            lambda: (mask >= 0) & (mask <= 1),
            "mask values must be finite and in [0, 1] (NaN, Inf or out of range found)",
        )
    elif mask.dtype != torch.bool:
        check_values(
            lambda: (mask == 0) | (mask == 1),
            f"mask of integer dtype {mask.dtype} must hold only 0 and 1; for a label "
            "map pass (labels == lesion_label)",
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


def _check_method_runs_compiled_models(modules: List[nn.Module], method: str) -> None:
    compiled = any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in modules)
    needs = {"exact": "double backward", "forward_mode": "forward-mode AD"}
    if compiled and method in needs:
        raise ValueError(
            f"method={method!r} needs {needs[method]}, which torch.compile'd models do "
            "not support; use method='finite_difference'"
        )


def _warn_on_coupled_batch_norm(modules: List[nn.Module], batch_size: int) -> None:
    if batch_size > 1 and training_batch_norms(modules):
        warn_at_caller(
            "BatchNorm in training mode couples the examples of a batch: the GradMask "
            "saliency is d(sum_b s_b)/dx_b, not the per-example d s_b/dx_b. Use "
            "GroupNorm or BatchNorm in eval mode for per-example saliency."
        )
