"""The one rule for per-example arguments, and the Captum methods it must know about.

An argument is per example when it holds one entry per example of the inputs' batch
of N: a Tensor whose dimension 0 has size N, or a list of N entries (Captum's
per-example ``target``; ``ContrastSaliency``'s ``contrast_target``). Tuples are looked
into entry by entry; anything else (numbers, strings, modules, Tensors of another
first size) is shared by all examples. In keyword arguments a Tensor with one row is
shared too, also at N = 1: Captum broadcasts baselines and feature masks of batch
size one. Wrappers that regroup the examples apply the rule here: ``MCAttribution``
repeats per-example arguments once per sub-network, ``IterativeUnveiling`` splits
them into chunks of ``examples_batch_size``. (GradMask runs the batch as given and
regroups nothing.)

Two exceptions, both Captum's: the ``baselines`` of the Shap methods (and of
``NoiseTunnel(draw_baseline_from_distrib=True)``) are a distribution to draw from, not
one baseline per example; and a few methods compute each example's attribution from
the whole batch, so regrouping the examples changes their results. Wrappers
(NoiseTunnel, MCAttribution) are looked through to find them.
"""

from typing import Dict, FrozenSet, List, Tuple

from captum.attr import (
    Attribution,
    DeepLift,
    DeepLiftShap,
    FeaturePermutation,
    GradientShap,
    LayerDeepLift,
    LayerDeepLiftShap,
    LayerGradientShap,
    NeuronDeepLift,
    NeuronDeepLiftShap,
    NeuronGradientShap,
    NoiseTunnel,
)
from torch import Tensor, nn

_BASELINE_DISTRIBUTION_METHODS = (
    GradientShap,
    LayerGradientShap,
    NeuronGradientShap,
    DeepLiftShap,
    LayerDeepLiftShap,
    NeuronDeepLiftShap,
)
# DeepLift's rule for nn.Softmax subtracts the mean multiplier over the whole batch.
_DEEPLIFT_METHODS = (
    DeepLift,
    LayerDeepLift,
    NeuronDeepLift,
    DeepLiftShap,
    LayerDeepLiftShap,
    NeuronDeepLiftShap,
)


def is_per_example(value: object, n_examples: int) -> bool:
    if isinstance(value, Tensor):
        return value.dim() > 0 and value.shape[0] == n_examples
    return isinstance(value, list) and len(value) == n_examples


def repeat_examples(value: object, copies: int, n_examples: int) -> object:
    """``value`` for a batch of ``copies`` x N rows where row c * N + n is example n
    (Captum's "repeat" expansion); shared values are returned as they are."""
    if isinstance(value, tuple):
        return tuple(repeat_examples(item, copies, n_examples) for item in value)
    if not is_per_example(value, n_examples):
        return value
    if isinstance(value, list):
        return value * copies
    return value.repeat(copies, *([1] * (value.dim() - 1)))


def select_examples(value: object, rows: slice, n_examples: int) -> object:
    """``value`` for the examples ``rows`` of the batch; shared values as they are."""
    if isinstance(value, tuple):
        return tuple(select_examples(item, rows, n_examples) for item in value)
    return value[rows] if is_per_example(value, n_examples) else value


def regrouped_keywords(
    attribution_method: Attribution, kwargs: Dict[str, object], regroup
) -> Dict[str, object]:
    """``kwargs`` of ``attribution_method.attribute`` with ``regroup`` applied to every
    per-example argument, leaving baseline distributions and one-row Tensors whole."""
    shared = distribution_keywords(attribution_method, kwargs)
    return {
        key: value if key in shared else _regroup_keyword(value, regroup)
        for key, value in kwargs.items()
    }


def _regroup_keyword(value: object, regroup) -> object:
    if isinstance(value, tuple):
        return tuple(_regroup_keyword(item, regroup) for item in value)
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == 1:
        return value
    return regroup(value)


def distribution_keywords(attribution_method: Attribution, kwargs: Dict[str, object]) -> FrozenSet[str]:
    """The keyword arguments that are a distribution to draw from (``baselines`` of
    the Shap methods), looking through wrappers."""
    for method in wrapper_chain(attribution_method):
        drawn_by_noise_tunnel = isinstance(method, NoiseTunnel) and kwargs.get("draw_baseline_from_distrib")
        if drawn_by_noise_tunnel or isinstance(method, _BASELINE_DISTRIBUTION_METHODS):
            return frozenset({"baselines"})
    return frozenset()


def wrapper_chain(attribution_method: Attribution) -> List[Attribution]:
    """The method, the method it wraps (NoiseTunnel, MCAttribution, ...), and so on."""
    chain = [attribution_method]
    while hasattr(chain[-1], "attribution_method"):
        chain.append(chain[-1].attribution_method)
    return chain


def batch_dependence(attribution_method: Attribution, forward_func: object) -> str:
    """Why ``attribution_method`` computes an example's attribution from the other
    examples of its batch, or "" if it does not (as far as Captum's methods go).
    Wrappers (NoiseTunnel, MCAttribution) are looked through."""
    attribution_method = wrapper_chain(attribution_method)[-1]
    if isinstance(attribution_method, FeaturePermutation):
        return "FeaturePermutation permutes each feature across the examples of the batch"
    if isinstance(attribution_method, _DEEPLIFT_METHODS) and _has_softmax(forward_func):
        return (
            f"{type(attribution_method).__name__}'s rule for nn.Softmax normalises over "
            "the whole batch"
        )
    return ""


def _has_softmax(forward_func: object) -> bool:
    # DeepLift needs an nn.Module forward function (it refuses anything else).
    return isinstance(forward_func, nn.Module) and any(
        isinstance(module, nn.Softmax) for module in forward_func.modules()
    )


def check_per_example_count(value: object, name: str, n_examples: int) -> None:
    """A list or multi-element Tensor ``value`` (e.g. ``target``) must have one entry
    per example."""
    if isinstance(value, list) and len(value) != n_examples:
        raise ValueError(
            f"{name} has {len(value)} entries but inputs have {n_examples} examples; "
            "give one entry per example or a single int/tuple"
        )
    if isinstance(value, Tensor) and value.numel() > 1 and tuple(value.shape) != (n_examples,):
        raise ValueError(
            f"{name} as a Tensor must have shape ({n_examples},), one entry per example, "
            f"or one element; got shape {tuple(value.shape)}"
        )



def check_keyword_rows(
    kwargs: Dict[str, object], inputs: Tuple[Tensor, ...], shared: FrozenSet[str]
) -> None:
    """``baselines`` and ``feature_mask`` Tensors shaped like an input must have one
    row or one per example (Captum's rule), so that a wrapper that changes the number
    of rows cannot pass a wrong count off as right."""
    n_examples = inputs[0].shape[0]
    for name in ("baselines", "feature_mask"):
        if name in shared or kwargs.get(name) is None:
            continue
        value = kwargs[name]
        entries = value if isinstance(value, tuple) else (value,)
        for position, (entry, input) in enumerate(zip(entries, inputs)):
            if not isinstance(entry, Tensor) or entry.dim() != input.dim():
                continue  # a number, or a Tensor broadcast from the right
            if entry.shape[0] not in (1, n_examples):
                label = f"{name}[{position}]" if isinstance(value, tuple) else name
                raise ValueError(
                    f"{label} has {entry.shape[0]} rows but inputs have {n_examples} "
                    f"examples; give one row per example or one row for all"
                )
