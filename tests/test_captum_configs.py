"""Captum's own test configurations replayed through ``MCAttribution``.

Captum ships the configurations its DataParallel, JIT and target tests run
(``captum.testing.attr.helpers.test_config.config``: 77 configurations, 288
(configuration, algorithm) cases). Each case here runs the configuration's algorithm,
layer(s) and ``attribute`` arguments on the configuration's model behind one dropout
layer on its first input (``InputDropout``), in float64, through
``MCAttribution(algorithm, MCDropout(wrapper, n_samples=3, seed=0))``.

The reference does not use ``MCDropout`` or ``MCAttribution`` to compute anything:

1. The input mask of each sub-network is probed once (``helpers.sub_network_masks``):
   a pre-hook feeds ones to the wrapper's dropout layer during one ``mc_model`` call,
   a hook records what comes out; row t * N is sub-network t's mask.
2. Sub-network t is the same wrapper in eval mode with a forward hook on its dropout
   layer that returns ``input * mask_t`` (``helpers.per_sub_network``); the plain
   Captum method (same algorithm, same layer objects) attributes it with the
   configuration's arguments as they are.
3. The mean (and population std, and mean convergence delta) over t = 0..T-1 is what
   ``MCAttribution`` must return.

Deterministic methods are compared with all T sub-networks in one call and with one
per call. Methods whose results depend on random draws (the GradientShap family,
FeaturePermutation, ShapleyValueSampling, Lime, KernelShap) are compared one
sub-network per call, with the global seeds set before ``MCAttribution`` and before
the reference loop, so that the t-th call draws what the reference's t-th call
draws. (Captum's NoiseTunnel configurations use ``stdevs=0.0``: the noise drawn is
exactly zero, so they are compared both ways.)

BasicModel_ConvNet's classifier head has all-ones weights, which makes its softmax
output the same for every input: attributions of it are zero up to rounding. The
cases that explain its output run a second time with that head redrawn
(``redraw_convnet_head``), so that the comparison has something to compare.

Part 2 replays the image configurations (BasicModel_ConvNet) through
``IterativeUnveiling`` against the unveiling loop of the design, written out here.

Every case passes or is refused with a clear error; the counts are at the end of the
module.
"""

import copy
import inspect
import random
from typing import List, NamedTuple, Optional

import numpy as np
import pytest
import torch
from captum.attr import (
    FeaturePermutation,
    GradientShap,
    KernelShap,
    LayerGradientShap,
    Lime,
    NeuronGradientShap,
    NoiseTunnel,
    ShapleyValueSampling,
)
from captum.attr._models.base import _get_deep_layer_name
from captum.testing.helpers.basic_models import BasicModel_ConvNet
from torch import Tensor, nn

from captum_gradmask import IterativeUnveiling, MCAttribution, MCDropout, refine_mask
from helpers import per_sub_network


def _import_captum_configs():
    """Captum's config module seeds every generator and sets cudnn.deterministic at
    import; undo that so that other test modules see the state they would without it."""
    torch_state, python_state, numpy_state = (
        torch.get_rng_state(),
        random.getstate(),
        np.random.get_state(),
    )
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    deterministic = torch.backends.cudnn.deterministic
    try:
        from captum.testing.attr.helpers.gen_test_utils import parse_test_config
        from captum.testing.attr.helpers.test_config import config
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        torch.backends.cudnn.deterministic = deterministic
    return config, parse_test_config


CAPTUM_CONFIGS, parse_test_config = _import_captum_configs()

N_SUB_NETWORKS = 3
DROPOUT_P = 0.3
SEED = 0
# float64 on tiny models: the batched and the looped computation differ only by
# rounding (other BLAS blockings for other row counts), ~1e-15 relative.
RTOL = 1e-10
ATOL_PER_UNIT = 1e-10  # absolute tolerance, times the largest |mean attribution|

RANDOM_METHODS = (
    GradientShap,
    LayerGradientShap,
    NeuronGradientShap,
    FeaturePermutation,
    ShapleyValueSampling,
    Lime,
    KernelShap,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Captum's notices about its hooks, its batching and Lime's per-example models.
    pytest.mark.filterwarnings("ignore:Setting forward, backward hooks:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU:UserWarning"),
    pytest.mark.filterwarnings("ignore:You are providing multiple inputs for Lime:UserWarning"),
    pytest.mark.filterwarnings("ignore:Internal batch size cannot be less:UserWarning"),
    pytest.mark.filterwarnings("ignore:This method computes finite differences:UserWarning"),
    pytest.mark.filterwarnings("ignore:Multiple layers provided:UserWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def deterministic_cudnn():
    """Some maps compared exactly are rounding noise (see the module docstring): on
    CUDA both sides must run the same convolution algorithms."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


class Case(NamedTuple):
    config: dict
    algorithm: type
    noise_tunnel: bool
    head_redrawn: bool = False  # see redraw_convnet_head

    @property
    def name(self) -> str:
        suffix = "NoiseTunnel" if self.noise_tunnel else ""
        variant = "-fc2_redrawn" if self.head_redrawn else ""
        return f"{self.config['name']}-{self.algorithm.__name__}{suffix}{variant}"

    @property
    def result_is_random(self) -> bool:
        """Whether the random draws change the result: Captum's NoiseTunnel configs
        draw noise with ``stdevs=0.0``, exact zeros, around deterministic methods."""
        zero_noise = self.config["attribute_args"].get("stdevs") == 0.0
        wrapped_random = issubclass(self.algorithm, RANDOM_METHODS)
        return wrapped_random or (self.noise_tunnel and not zero_noise)


def all_cases() -> List[Case]:
    """Captum's 288 cases, then again those that attribute BasicModel_ConvNet's
    output with its classifier head redrawn."""
    cases, redrawn = [], []
    for config in CAPTUM_CONFIGS:
        algorithms, model, args, _, noise_tunnel, _ = parse_test_config(config)
        cases += [Case(config, algorithm, noise_tunnel) for algorithm in algorithms]
        if isinstance(model, BasicModel_ConvNet) and "target" in args:
            redrawn += [Case(config, algorithm, noise_tunnel, True) for algorithm in algorithms]
    return cases + redrawn


# --- the wrapped model and the configuration's arguments ------------------------------


class InputDropout(nn.Module):
    """``model`` with dropout on its first input; the other arguments pass through."""

    def __init__(self, model: nn.Module, p: float = DROPOUT_P) -> None:
        super().__init__()
        self.model = model
        self.dropout = nn.Dropout(p)

    def forward(self, first_input: Tensor, *other_args: object) -> Tensor:
        return self.model(self.dropout(first_input), *other_args)


def float64_on(value: object, device) -> object:
    """``value`` with float Tensors in float64 on ``device`` (int Tensors keep their
    dtype), looking into tuples and lists."""
    if isinstance(value, Tensor):
        dtype = torch.float64 if value.is_floating_point() else value.dtype
        return value.to(device=device, dtype=dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(float64_on(item, device) for item in value)
    return value


class Replay(NamedTuple):
    wrapper: InputDropout
    layer: object  # None, a module, or a list of modules
    args: dict  # the configuration's attribute arguments, float64 on the device


def redraw_convnet_head(model: nn.Module, inputs: Tensor) -> None:
    """BasicModel_ConvNet's fc2 has all-ones weights: every logit moves by the same
    amount, so the softmax output, and every attribution of it, is the same for all
    inputs and sub-networks (zero up to rounding). Redraw fc2.weight ~ N(0, 1 / s^2),
    s the mean |fc2 input| on ``inputs``, so the softmax is neither constant nor
    saturated."""
    fc2_inputs = []
    handle = model.fc2.register_forward_pre_hook(lambda module, args: fc2_inputs.append(args[0]))
    with torch.no_grad():
        model(inputs)
    handle.remove()
    weight = model.fc2.weight
    generator = torch.Generator().manual_seed(SEED)
    redrawn = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
    with torch.no_grad():
        weight.copy_(redrawn.to(weight.device) / fc2_inputs[0].abs().mean())


def replay_of(case: Case, device) -> Replay:
    _, model, args, layer_names, _, _ = parse_test_config(case.config)
    args = {key: float64_on(value, device) for key, value in args.items()}
    model = copy.deepcopy(model).to(device=device, dtype=torch.float64)
    if case.head_redrawn:
        redraw_convnet_head(model, args["inputs"])
    wrapper = InputDropout(model)
    if layer_names is None:
        layer = None
    elif isinstance(layer_names, str):
        layer = _get_deep_layer_name(wrapper.model, layer_names)
    else:
        layer = [_get_deep_layer_name(wrapper.model, name) for name in layer_names]
    return Replay(wrapper, layer, args)


def build_method(algorithm: type, forward_func, layer, noise_tunnel: bool):
    method = algorithm(forward_func) if layer is None else algorithm(forward_func, layer)
    return NoiseTunnel(method) if noise_tunnel else method


# --- the independent reference ---------------------------------------------------------


def leaves(structure: object) -> List[Tensor]:
    if isinstance(structure, Tensor):
        return [structure]
    return [leaf for item in structure for leaf in leaves(item)]


def rebuild(structure: object, values) -> object:
    if isinstance(structure, Tensor):
        return next(values)
    return type(structure)(rebuild(item, values) for item in structure)


class Summary(NamedTuple):
    mean: object
    std: object
    delta: Optional[Tensor]


def reference_summary(case: Case, replay: Replay, mc_model: MCDropout, with_delta: bool) -> Summary:
    """Mean, std and mean delta of the plain method over the fixed-mask sub-networks."""
    method = build_method(case.algorithm, replay.wrapper, replay.layer, case.noise_tunnel)
    kwargs = dict(replay.args, return_convergence_delta=True) if with_delta else replay.args
    results = per_sub_network(
        mc_model, replay.args["inputs"], lambda: method.attribute(**kwargs),
        replay.args.get("additional_forward_args"),
    )
    deltas = []
    if with_delta:
        results, deltas = zip(*results)
    per_leaf = [
        torch.stack([leaf.detach() for leaf in group]) for group in zip(*map(leaves, results))
    ]
    return Summary(
        mean=rebuild(results[0], iter([stack.mean(0) for stack in per_leaf])),
        std=rebuild(results[0], iter([stack.std(0, correction=0) for stack in per_leaf])),
        delta=torch.stack([delta.detach() for delta in deltas]).mean(0) if with_delta else None,
    )


def has_convergence_delta(case: Case, replay: Replay) -> bool:
    method = build_method(case.algorithm, replay.wrapper, replay.layer, case.noise_tunnel)
    return method.has_convergence_delta()


# --- MCAttribution -------------------------------------------------------------------


def mc_attribution(case: Case, mc_model: MCDropout, layer) -> MCAttribution:
    if case.noise_tunnel:
        return MCAttribution(
            lambda forward: build_method(case.algorithm, forward, layer, True), mc_model
        )
    if layer is None:
        return MCAttribution(case.algorithm, mc_model)
    return MCAttribution(case.algorithm, mc_model, layer=layer)


def mc_summary(case: Case, mc_model: MCDropout, replay: Replay, with_delta: bool, batch_size):
    kwargs = dict(replay.args, return_convergence_delta=True) if with_delta else replay.args
    result = mc_attribution(case, mc_model, replay.layer).attribute(
        return_std=True, mc_samples_batch_size=batch_size, **kwargs
    )
    return Summary(*result) if with_delta else Summary(*result, None)


def assert_summaries_match(actual: Summary, expected: Summary, what: str) -> None:
    assert type(actual.mean) is type(expected.mean), what
    expected_leaves = leaves(expected.mean)
    scale = max(1.0, max(float(leaf.abs().max()) for leaf in expected_leaves))
    pairs = [("mean", actual.mean, expected.mean), ("std", actual.std, expected.std)]
    if expected.delta is not None:
        pairs.append(("delta", actual.delta, expected.delta))
    for field, got, want in pairs:
        got_leaves, want_leaves = leaves(got), leaves(want)
        assert len(got_leaves) == len(want_leaves), f"{what}: {field} structure"
        for got_leaf, want_leaf in zip(got_leaves, want_leaves):
            torch.testing.assert_close(
                got_leaf,
                want_leaf,
                rtol=RTOL,
                atol=ATOL_PER_UNIT * scale,
                msg=lambda message: f"{what}, {field}: {message}",
            )


def seed_global_generators(seed: int) -> None:
    """Torch's generator, and NumPy's: the GradientShap family draws its baseline
    indices and interpolation coefficients with ``np.random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def replay_case(case: Case, device) -> None:
    replay = replay_of(case, device)
    mc_model = MCDropout(replay.wrapper, n_samples=N_SUB_NETWORKS, seed=SEED)
    with_delta = has_convergence_delta(case, replay)
    # Random methods draw per call: only one sub-network per call draws what the
    # reference's call for that sub-network draws.
    batch_sizes = [1] if case.result_is_random else [None, 1]
    for batch_size in batch_sizes:
        seed_global_generators(SEED)
        actual = mc_summary(case, mc_model, replay, with_delta, batch_size)
        seed_global_generators(SEED)
        expected = reference_summary(case, replay, mc_model, with_delta)
        assert_summaries_match(actual, expected, f"mc_samples_batch_size={batch_size}")


CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_mc_attribution_equals_mean_over_fixed_mask_sub_networks(case, device):
    replay_case(case, device)


# === Part 2: IterativeUnveiling on Captum's image configurations ========================
#
# The configurations on BasicModel_ConvNet (inputs (4, 1, 10, 10)), model as given (no
# dropout), replayed through IterativeUnveiling(method).unveil and against the loop the
# design describes, written out below: attribute the current input, upsample a layer
# map to the input, zero it where hidden (and for samples that found nothing last
# time), refine it into a mask, hide the new region with the fill, score the target.

UNVEIL_OPTIONS = {"n_iter": 3, "kernel_size": 3, "n_passes": 1, "threshold": 0.5}
BLUR_PASSES = 3  # the documented fill="blur": the input box-blurred 3 times


class UnveilCase(NamedTuple):
    case: Case
    fill_kind: str  # "zero", "mean", "another_image" or "blur"
    scored_target: Optional[int] = None  # given to unveil when the config has no target

    @property
    def name(self) -> str:
        scored = "" if self.scored_target is None else f"-scored_target_{self.scored_target}"
        return f"{self.case.name}-fill_{self.fill_kind}{scored}"


def unveil_cases() -> List[UnveilCase]:
    """Each BasicModel_ConvNet case with fill 0; those of neuron methods, which take
    no target, again with output 0 scored; those whose target output is explained,
    again with every kind of fill. The second runs have the head redrawn (see
    ``redraw_convnet_head``), so that scores change."""
    image_cases = [case for case in CASES if isinstance(case.config["model"], BasicModel_ConvNet)]
    original = [UnveilCase(case, "zero") for case in image_cases if not case.head_redrawn]
    original += [
        UnveilCase(case._replace(head_redrawn=True), "zero", scored_target=0)
        for case in image_cases
        if not case.head_redrawn and "target" not in case.config["attribute_args"]
    ]
    redrawn = [
        UnveilCase(case, fill_kind)
        for case in image_cases
        if case.head_redrawn
        for fill_kind in ("zero", "mean", "another_image", "blur")
    ]
    return original + redrawn


def refused_for_want_of_a_target(unveil_case: UnveilCase) -> bool:
    """Neuron methods explain a neuron, not an output: their configurations have no
    target, and unveiling needs one target score per example."""
    no_target = "target" not in unveil_case.case.config["attribute_args"]
    return no_target and unveil_case.scored_target is None


class UnveilReplay(NamedTuple):
    method: object  # the plain Captum method on the model
    model: nn.Module
    inputs: Tensor
    target: object  # scored; also explained by methods that take a target
    method_kwargs: dict  # the configuration's other attribute arguments
    fill: object  # as unveil takes it
    fill_values: Tensor  # what hidden pixels become, computed here


def box_blurred(image: Tensor, kernel_size: int) -> Tensor:
    """The input box-blurred BLUR_PASSES times with zero padding, divided by the
    same blur of ones (edge correction)."""

    def box_mean(x: Tensor) -> Tensor:
        return torch.nn.functional.avg_pool2d(
            x, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True
        )

    blurred, coverage = image, torch.ones_like(image[:1, :1])
    for _ in range(BLUR_PASSES):
        blurred, coverage = box_mean(blurred), box_mean(coverage)
    return blurred / coverage


def unveil_replay_of(unveil_case: UnveilCase, device) -> UnveilReplay:
    case = unveil_case.case
    _, model, args, layer_name, noise_tunnel, _ = parse_test_config(case.config)
    args = {key: float64_on(value, device) for key, value in args.items()}
    model = copy.deepcopy(model).to(device=device, dtype=torch.float64)
    inputs = args.pop("inputs")
    target = args.pop("target", unveil_case.scored_target)
    if case.head_redrawn:
        redraw_convnet_head(model, inputs)
    layer = None if layer_name is None else _get_deep_layer_name(model, layer_name)
    method = build_method(case.algorithm, model, layer, noise_tunnel)
    fill, fill_values = {
        "zero": lambda: (0.0, torch.zeros_like(inputs)),
        "mean": lambda: ("mean", inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)),
        "another_image": lambda: (inputs.roll(1, dims=0), inputs.roll(1, dims=0)),
        "blur": lambda: ("blur", box_blurred(inputs, UNVEIL_OPTIONS["kernel_size"])),
    }[unveil_case.fill_kind]()
    takes_baselines = "baselines" in inspect.signature(method.attribute).parameters
    if unveil_case.fill_kind == "blur" and takes_baselines:
        args["baselines"] = fill_values  # the docstring's use: blurred baselines, blurred fill
    return UnveilReplay(method, model, inputs, target, args, fill, fill_values)


def target_scores(model: nn.Module, inputs: Tensor, target: int) -> Tensor:
    with torch.no_grad():
        return model(inputs)[:, target]


def reference_unveiling(replay: UnveilReplay):
    """Masks (N, K, 1, H, W), attributions (N, K, C', H, W) and scores (N, K + 1) of
    the unveiling loop, written from the design."""
    inputs, n_examples = replay.inputs, replay.inputs.shape[0]
    hidden = torch.zeros_like(inputs[:, :1], dtype=torch.bool)
    stopped = torch.zeros(n_examples, 1, 1, 1, dtype=torch.bool, device=inputs.device)
    current = inputs
    masks, attributions = [], []
    scores = [target_scores(replay.model, inputs, replay.target)]
    method_kwargs = dict(replay.method_kwargs)
    if "target" in inspect.signature(replay.method.attribute).parameters:
        method_kwargs["target"] = replay.target  # neuron methods explain their neuron
    for _ in range(UNVEIL_OPTIONS["n_iter"]):
        attribution = replay.method.attribute(current, **method_kwargs).detach()
        if attribution.shape[2:] != inputs.shape[2:]:  # a layer map
            attribution = torch.nn.functional.interpolate(
                attribution, size=inputs.shape[2:], mode="bilinear"
            )
        attribution = attribution.masked_fill(hidden | stopped, 0)
        mask = refine_mask(
            attribution,
            UNVEIL_OPTIONS["kernel_size"],
            UNVEIL_OPTIONS["n_passes"],
            UNVEIL_OPTIONS["threshold"],
        ) & ~hidden
        stopped = ~mask.flatten(1).any(1).view(-1, 1, 1, 1)
        hidden = hidden | mask
        current = torch.where(hidden, replay.fill_values, inputs)
        masks.append(mask)
        attributions.append(attribution)
        scores.append(target_scores(replay.model, current, replay.target))
    return torch.stack(masks, 1), torch.stack(attributions, 1), torch.stack(scores, 1)


def replay_unveiling(unveil_case: UnveilCase, device) -> None:
    replay = unveil_replay_of(unveil_case, device)
    seed_global_generators(SEED)
    result = IterativeUnveiling(replay.method).unveil(
        replay.inputs, target=replay.target, fill=replay.fill, **UNVEIL_OPTIONS,
        **replay.method_kwargs,
    )
    seed_global_generators(SEED)
    masks, attributions, scores = reference_unveiling(replay)
    assert torch.equal(result.masks, masks), "masks differ"
    if unveil_case.fill_kind == "blur":
        # Our blur (avg_pool2d) and unveiling's (cumulative sums) round differently:
        # the filled inputs, and so maps and scores, differ by ~1e-16 relative.
        tolerance = {"rtol": 1e-10, "atol": 1e-10 * max(1.0, float(scores.abs().max()))}
        map_tolerance = {"rtol": 1e-10, "atol": 1e-10 * max(1.0, float(attributions.abs().max()))}
    else:
        tolerance = map_tolerance = {"rtol": 0.0, "atol": 0.0}
    torch.testing.assert_close(result.scores, scores, **tolerance)
    torch.testing.assert_close(result.attributions, attributions, **map_tolerance)
    found_at = torch.arange(1, masks.shape[1] + 1, device=device).view(1, -1, 1, 1, 1)
    assert torch.equal(result.order, (masks * found_at).sum(1))
    assert torch.equal(result.n_found, masks.flatten(2).any(2).sum(1))


UNVEIL_CASES = unveil_cases()


@pytest.mark.parametrize("unveil_case", UNVEIL_CASES, ids=[case.name for case in UNVEIL_CASES])
def test_iterative_unveiling_equals_design_loop(unveil_case, device):
    if refused_for_want_of_a_target(unveil_case):
        with pytest.raises(ValueError, match="target must select one model output per example"):
            replay_unveiling(unveil_case, device)
    else:
        replay_unveiling(unveil_case, device)


# === Summary ===========================================================================
#
# Part 1 (MCAttribution): 304 cases (Captum's 288, and 16 on BasicModel_ConvNet with the
#   head redrawn), all pass.
# Part 2 (IterativeUnveiling): 106 cases: 93 pass, 13 refused (neuron methods without a
#   target: nothing to score).
# Weak cases, reported rather than hidden: on Captum's BasicModel_ConvNet the 16 part-1
# cases explaining the softmax output (and the 16 part-2 cases with its head as given)
# compare maps that are rounding noise; the 9 InternalInfluence cases on
# BasicModel_MultiLayer do not depend on the dropout mask (linear2 has all-ones
# weights). With the head redrawn, FeatureAblation, FeaturePermutation, Lime, Occlusion
# and NeuronConductance still give all-zero mean maps in part 1, Lime and
# NeuronConductance all-zero maps in part 2.


def test_case_counts():
    assert len(CAPTUM_CONFIGS) == 77
    assert sum(not case.head_redrawn for case in CASES) == 288 and len(CASES) == 304
    refused = sum(map(refused_for_want_of_a_target, UNVEIL_CASES))
    assert (len(UNVEIL_CASES), refused) == (106, 13)
