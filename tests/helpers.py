"""Small models and references shared by the tests."""

import copy
import functools
import itertools
from typing import Callable, Dict, List, NamedTuple

import torch
import torch.nn.functional as F
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from torch import nn

from captum_gradmask import (
    ContrastSaliency,
    GradMask,
    IterativeUnveiling,
    MCAttribution,
    MCDropout,
    differentiable,
    gradmask_penalty,
    predictive_uncertainty,
    refine_mask,
)
from captum_gradmask import metrics
from captum_gradmask._batching import repeat_examples


def small_cnn(in_channels: int = 1, n_classes: int = 2, side: int = 6) -> nn.Module:
    """A smooth (tanh) CNN, so second derivatives are non-zero everywhere."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * side * side, n_classes),
    )


def contrast_reference(model, x, target, contrast):
    """d|z_t - z_c|/dx per example, by float64 autograd on a hand-written objective."""
    x = x.detach().double().requires_grad_()
    logits = copy.deepcopy(model).double()(x)
    rows = torch.arange(x.shape[0])
    difference = (logits[rows, target] - logits[rows, contrast]).abs()
    (gradient,) = torch.autograd.grad(difference.sum(), x)
    return gradient


class ModelState:
    """Snapshot of what a call must not change on a model and its inputs."""

    def __init__(self, model: nn.Module, *tensors: torch.Tensor):
        self.model = model
        self.modes = [m.training for m in model.modules()]
        self.hooks = [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ]
        self.param_flags = [p.requires_grad for p in model.parameters()]
        self.tensors = tensors
        self.tensor_flags = [t.requires_grad for t in tensors]

    def assert_unchanged(self):
        assert [m.training for m in self.model.modules()] == self.modes
        assert [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in self.model.modules()
        ] == self.hooks
        assert [p.requires_grad for p in self.model.parameters()] == self.param_flags
        assert [t.requires_grad for t in self.tensors] == self.tensor_flags


# --- every public entry point that runs a model, on one tiny model -----------------

SIDE = 5


def tiny_dropout_cnn(batchnorm: bool = False) -> nn.Module:
    """A 2-logit CNN on (N, 2, SIDE, SIDE) inputs with a dropout layer (so MCDropout
    accepts it) and, if asked, BatchNorm; float64, in eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1),
        nn.BatchNorm2d(2) if batchnorm else nn.Identity(),
        nn.Tanh(),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(2 * SIDE * SIDE, 2),
    ).double().eval()


class EntryPoint(NamedTuple):
    """``call(model, inputs, mask, baselines)`` runs one public entry point; the
    flags say which of ``mask`` and ``baselines`` it reads, ``baselines_name`` what
    the entry point calls its reference tensor."""

    call: Callable
    uses_mask: bool = False
    uses_baselines: bool = False
    baselines_name: str = "baselines"


def _gradmask_module(**options) -> EntryPoint:
    return EntryPoint(lambda model, x, mask, baselines: GradMask(model, **options)(x, mask), True)


def _gradmask_function(**options) -> EntryPoint:
    return EntryPoint(lambda model, x, mask, baselines: gradmask_penalty(model, x, mask, **options), True)


def _differentiable(method, **kwargs) -> EntryPoint:
    return EntryPoint(
        lambda model, x, mask, baselines: differentiable(method(model)).attribute(
            x, target=1, **({"baselines": baselines} if "n_steps" in kwargs else {}), **kwargs
        ),
        uses_baselines="n_steps" in kwargs,
    )


def _unveiling(method_name: str) -> EntryPoint:
    def call(model, x, mask, baselines):
        unveiling = IterativeUnveiling(Saliency(model))
        return getattr(unveiling, method_name)(
            x, target=1, n_iter=2, kernel_size=3, fill=baselines
        )

    return EntryPoint(call, uses_baselines=True, baselines_name="fill")


MODEL_ENTRY_POINTS = {
    "ContrastSaliency": EntryPoint(
        lambda model, x, mask, baselines: ContrastSaliency(model).attribute(x, target=1, contrast_target=0)
    ),
    "differentiable(Saliency)": _differentiable(Saliency, abs=False),
    "differentiable(InputXGradient)": _differentiable(InputXGradient),
    "differentiable(IntegratedGradients)": _differentiable(IntegratedGradients, n_steps=3),
    "GradMask": _gradmask_module(),
    "GradMask(finite_difference)": _gradmask_module(method="finite_difference"),
    "gradmask_penalty(input_x_gradient)": _gradmask_function(saliency="input_x_gradient"),
    "gradmask_penalty(finite_difference, input_x_gradient)": _gradmask_function(
        method="finite_difference", saliency="input_x_gradient"
    ),
    "gradmask_penalty(expected_gradients)": _gradmask_function(saliency="expected_gradients"),
    "gradmask_penalty(finite_difference, expected_gradients)": _gradmask_function(
        method="finite_difference", saliency="expected_gradients"
    ),
    "IterativeUnveiling.attribute": _unveiling("attribute"),
    "IterativeUnveiling.unveil": _unveiling("unveil"),
    "MCDropout": EntryPoint(
        lambda model, x, mask, baselines: MCDropout(model, n_samples=3)(x, mc_samples_batch_size=2)
    ),
    "MCDropout.uncertainty": EntryPoint(
        lambda model, x, mask, baselines: MCDropout(model, n_samples=3).uncertainty(x)
    ),
    "MCAttribution(IntegratedGradients)": EntryPoint(
        lambda model, x, mask, baselines: MCAttribution(
            IntegratedGradients, MCDropout(model, n_samples=3)
        ).attribute(x, target=1, baselines=baselines, n_steps=3, mc_samples_batch_size=2),
        uses_baselines=True,
    ),
}


def model_arguments(n: int = 2, device="cpu"):
    """Inputs (n, 2, SIDE, SIDE), lesion mask (n, 1, SIDE, SIDE) and baselines for the
    entry points, float64."""
    generator = torch.Generator().manual_seed(n)
    x = torch.rand(n, 2, SIDE, SIDE, generator=generator, dtype=torch.float64).to(device)
    mask = torch.zeros_like(x[:, :1])
    mask[..., 1:3, 1:3] = 1
    return x, mask, torch.zeros_like(x)


def result_tensors(result: object) -> List[torch.Tensor]:
    """The tensors of a result: a Tensor, a number, or a (named) tuple of them, flattened."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, float):
        return [torch.tensor(result)]
    return [t for item in result for t in result_tensors(item)]


# --- every public entry point that takes tensors only -------------------------------


def _maps(n: int, channels: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(n)
    return torch.rand(n, channels, SIDE, SIDE, generator=generator, dtype=torch.float64) + 0.1


def _lesions(n: int) -> torch.Tensor:
    """Float masks (n, 1, SIDE, SIDE), a 2x2 square inside; one pixel moves per example."""
    masks = torch.zeros(n, 1, SIDE, SIDE, dtype=torch.float64)
    masks[..., 1:3, 1:3] = 1
    masks[torch.arange(n), 0, -1, torch.arange(n) % SIDE] = 1
    return masks


def _probabilities(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(n)
    logits = torch.randn(3, n, 2, SIDE, generator=generator, dtype=torch.float64)
    return logits.softmax(dim=2)


class FunctionEntryPoint(NamedTuple):
    """``call(**arguments(n))`` runs one public function on a batch of n examples;
    the argument names are the function's own parameter names."""

    call: Callable
    arguments: Callable[[int], Dict[str, torch.Tensor]]


def _attributions_and_masks(n: int) -> Dict[str, torch.Tensor]:
    return {"attributions": _maps(n), "masks": _lesions(n)}


def _two_masks(n: int) -> Dict[str, torch.Tensor]:
    return {"masks": _maps(n).round(), "targets": _lesions(n)}


FUNCTION_ENTRY_POINTS = {
    "refine_mask": FunctionEntryPoint(
        functools.partial(refine_mask, kernel_size=3), lambda n: {"attributions": _maps(n, 2)}
    ),
    "pointing_game": FunctionEntryPoint(metrics.pointing_game, _attributions_and_masks),
    "pointing_game(tolerance)": FunctionEntryPoint(
        functools.partial(metrics.pointing_game, tolerance=1.5), _attributions_and_masks
    ),
    "relevance_mass_accuracy": FunctionEntryPoint(
        metrics.relevance_mass_accuracy, _attributions_and_masks
    ),
    "relevance_rank_accuracy": FunctionEntryPoint(
        metrics.relevance_rank_accuracy, _attributions_and_masks
    ),
    "mask_iou": FunctionEntryPoint(metrics.mask_iou, _two_masks),
    "mask_dice": FunctionEntryPoint(metrics.mask_dice, _two_masks),
    "region_recall": FunctionEntryPoint(
        metrics.region_recall,
        lambda n: {"masks": _maps(n)[:, None].round(), "regions": _lesions(n)[:, None]},
    ),
    "roc_auc": FunctionEntryPoint(
        metrics.roc_auc,
        lambda n: {"scores": _maps(n).flatten()[: 2 * n], "labels": torch.arange(2 * n) % 2},
    ),
    "predictive_uncertainty": FunctionEntryPoint(
        predictive_uncertainty, lambda n: {"probs": _probabilities(n)}
    ),
}


# --- the GradMask penalty written out by hand (float64 references) ---


def dilate_reference(mask, radius):
    """Max over the (2r+1)^d window, by explicit shifts of a zero-padded mask (zero
    padding is neutral for a max because masks are >= 0)."""
    spatial = mask.shape[2:]
    padded = F.pad(mask, [radius] * 2 * len(spatial))
    dilated = torch.zeros_like(mask)
    for offset in itertools.product(range(2 * radius + 1), repeat=len(spatial)):
        window = tuple(slice(o, o + size) for o, size in zip(offset, spatial))
        dilated = torch.maximum(dilated, padded[(..., *window)])
    return dilated


def reference_penalty(
    model, x, mask, has_mask=None, *, variant="contrast", target=1, contrast_target=0,
    saliency="gradient", norm="sq_l2", reduction="mean", dilate=0, baseline=None, alpha=None,
    layer=None,
):
    """DESIGN.md section 3 written out by hand. It double-backprops sum_b s_b, which
    gives d s_b / d x_b when examples do not interact (no BatchNorm in training).
    Layer saliencies: the map at ``layer``'s output, upsampled to the input."""
    x = x.detach()
    point = x if baseline is None else baseline + alpha * (x - baseline)
    point = point.clone().requires_grad_()
    layer_outputs = []
    handle = layer.register_forward_hook(lambda module, args, output: layer_outputs.append(output)) if layer else None
    logits = model(point)
    if handle:
        handle.remove()
    rows = torch.arange(len(x), device=x.device)
    labels = torch.as_tensor(target, device=x.device).expand(len(x))
    if variant == "rrr":  # sum_k log p_k, log p_k = z_k - log sum_j exp z_j
        s = (logits - logits.exp().sum(1, keepdim=True).log()).sum(1)
    else:
        s = logits[rows, labels]
    if variant == "contrast":
        s = (s - logits[:, contrast_target]).abs()
    if layer is not None:
        gradient = reference_layer_map(s.sum(), layer_outputs[0], saliency, x.shape[2:])
        mask = mask.amax(1, keepdim=True)  # a lesion in any channel
    else:
        (gradient,) = torch.autograd.grad(s.sum(), point, create_graph=True)
    if saliency == "input_x_gradient":
        gradient = x * gradient
    elif saliency == "expected_gradients":
        gradient = (x - baseline) * gradient
    outside = ((1 - dilate_reference(mask.to(x.dtype), dilate)) * gradient).flatten(1)
    if norm == "sq_l2":
        per_example = outside.pow(2).sum(1)
    elif norm == "l2":
        per_example = (outside.pow(2).sum(1) + torch.finfo(x.dtype).eps ** 2).sqrt()
    else:
        per_example = outside.abs().sum(1)
    if has_mask is not None:
        per_example = per_example[has_mask.bool()]
    if reduction == "sum" or len(per_example) == 0:
        return per_example.sum()
    return per_example.mean()


def reference_layer_map(objective, activation, saliency, input_size):
    """Grad-CAM (channel weights: the spatial mean of the gradient) or gradient x
    activation, summed over channels, no ReLU, upsampled linearly to the input."""
    (gradient,) = torch.autograd.grad(objective, activation, create_graph=True)
    if saliency == "layer_grad_cam":
        weights = gradient.flatten(2).mean(2)
        layer_map = torch.einsum("nk,nk...->n...", weights, activation)[:, None]
    else:
        layer_map = (gradient * activation).sum(1, keepdim=True)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(input_size)]
    return F.interpolate(layer_map, size=tuple(input_size), mode=mode, align_corners=False)


def path_draws(model, x, mask, seed, dilate=0):
    """The default reference of expected gradients (x inside the dilated mask, 0
    outside) and the alphas drawn, as GradMask draws them after the first forward
    pass, from the same seed."""
    torch.manual_seed(seed)
    model(x)
    alpha = torch.rand(len(x), *[1] * (x.dim() - 1), device=x.device, dtype=x.dtype)
    return x * dilate_reference(mask.to(x.dtype), dilate), alpha


def parameter_gradients(penalty, model):
    # The last bias never reaches the saliency of "class" and "target".
    return torch.autograd.grad(
        penalty, list(model.parameters()), retain_graph=True, materialize_grads=True
    )


def relative_error(actual, expected):
    actual = torch.cat([t.detach().flatten().double() for t in actual])
    expected = torch.cat([t.detach().flatten().double() for t in expected])
    return float((actual - expected).abs().max() / expected.abs().max())


# --- MC dropout: each sub-network on its own, independently of MCAttribution -------


def sub_network_masks(mc_model, inputs, additional_forward_args=None) -> Dict[tuple, torch.Tensor]:
    """Every stochastic layer's mask per sub-network, probed from outside, keyed by
    (layer, shape of one output row): (T, k, *row shape) for a layer that folds k rows
    into each example's (window attention), k = 1 otherwise.

    Each call's output is recorded before MCDropout's hook (a hook registered first)
    and after it (registered inside its sampling block), and divided. Dropout layers,
    the identity in eval mode, are fed ones so that no entry is 0; layers with one
    draw per row (stochastic depth) are read where the output is largest."""
    layers = [layer.module for layer in mc_model.stochastic_layers]
    fed_ones = [layer.module for layer in mc_model.stochastic_layers if layer.mask_kind != "sample"]
    before: Dict[nn.Module, List[torch.Tensor]] = {layer: [] for layer in layers}
    after: Dict[nn.Module, List[torch.Tensor]] = {layer: [] for layer in layers}
    inputs_tuple = inputs if isinstance(inputs, tuple) else (inputs,)
    extra = additional_forward_args if isinstance(additional_forward_args, tuple) else (
        () if additional_forward_args is None else (additional_forward_args,)
    )
    n_examples, n_samples = inputs_tuple[0].shape[0], mc_model.n_samples
    rows = repeat_examples(inputs_tuple + extra, n_samples, n_examples)
    row_samples = torch.arange(n_samples, device=inputs_tuple[0].device).repeat_interleave(n_examples)

    def record(into):
        return lambda module, args, output: into[module].append(output.detach())

    handles = [layer.register_forward_pre_hook(lambda m, args: (torch.ones_like(args[0]),)) for layer in fed_ones]
    handles += [layer.register_forward_hook(record(before)) for layer in layers]
    try:
        with mc_model.sampling(range(n_samples)):
            handles += [layer.register_forward_hook(record(after)) for layer in layers]
            with torch.no_grad():
                mc_model.run_rows(rows, row_samples)
    finally:
        for handle in handles:
            handle.remove()
    masks = {}
    for layer in layers:
        for unmasked, masked in zip(before[layer], after[layer]):
            ratio = masked if layer in fed_ones else _row_ratio(masked, unmasked)
            per_example = ratio.unflatten(0, (n_samples, n_examples, -1))  # (T, N, k, ...)
            assert torch.allclose(per_example, per_example[:, :1].expand_as(per_example)), (
                "a mask differs across the batch"
            )
            masks[layer, tuple(masked.shape[1:])] = per_example[:, 0]
    return masks


def _row_ratio(masked: torch.Tensor, unmasked: torch.Tensor) -> torch.Tensor:
    """The one factor per row of ``masked / unmasked``, read where |unmasked| is largest."""
    flat_masked, flat_unmasked = masked.flatten(1), unmasked.flatten(1)
    largest = flat_unmasked.abs().argmax(1, keepdim=True)
    factor = flat_masked.gather(1, largest) / flat_unmasked.gather(1, largest)
    return factor.view(-1, *[1] * (masked.dim() - 1))


def per_sub_network(mc_model, inputs, compute: Callable[[], object], additional_forward_args=None) -> List[object]:
    """``compute()`` once per sub-network t: the plain model in eval mode, each
    stochastic layer's output multiplied by sub-network t's mask."""
    masks = sub_network_masks(mc_model, inputs, additional_forward_args)
    model = mc_model.model
    modes = [m.training for m in model.modules()]
    model.eval()
    results = []
    try:
        for t in range(mc_model.n_samples):
            masks_t = {key: mask[t] for key, mask in masks.items()}
            handles = [
                layer.module.register_forward_hook(functools.partial(_times_mask, masks_t))
                for layer in mc_model.stochastic_layers
            ]
            try:
                results.append(compute())
            finally:
                for handle in handles:
                    handle.remove()
    finally:
        for module, mode in zip(model.modules(), modes):
            module.training = mode
    return results


def _times_mask(masks_t, module, args, output):
    mask = masks_t[module, tuple(output.shape[1:])]  # (k, ...): k rows folded per example
    return (output.reshape(-1, *mask.shape) * mask).reshape(output.shape)
