import copy
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from captum_gradmask.gradmask import GradMask, GradMaskOutput, gradmask_penalty
from helpers import (
    ModelState,
    dilate_reference,
    parameter_gradients,
    path_draws,
    reference_penalty,
    relative_error,
)

VARIANTS = ["contrast", "class", "target", "rrr"]
NORMS = ["sq_l2", "l2", "l1"]
SALIENCIES = ["gradient", "input_x_gradient", "expected_gradients"]
METHODS = ["exact", "forward_mode", "finite_difference"]
TOLERANCE = {"exact": 1e-9, "forward_mode": 1e-9, "finite_difference": 1e-4}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SIDE = {1: 8, 2: 5, 3: 4}
N_CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_thread")


# --- models, data and the float64 reference ---


def tanh_cnn(dims, in_channels=2, *extra, n_classes=N_CLASSES):
    """A smooth CNN for 1-3 spatial dims; ``extra`` modules go after the tanh."""
    return nn.Sequential(
        CONV[dims](in_channels, 3, 3, padding=1),
        nn.Tanh(),
        *extra,
        nn.Flatten(),
        nn.Linear(3 * SIDE[dims] ** dims, n_classes),
    )


def batch(dims, n=3, channels=2, mask_channels=1, device="cpu", dtype=torch.float64):
    spatial = (SIDE[dims],) * dims
    x = torch.randn(n, channels, *spatial, device=device, dtype=dtype)
    # Soft values and exact zeros, and a lesion of 1 in a corner that a dilation of
    # radius 2 leaves room around even in 3-D.
    mask = 0.5 * torch.rand(n, mask_channels, *spatial, device=device, dtype=dtype)
    mask = mask.where(mask > 0.15, 0.0)
    mask[(..., *[0] * dims)] = 1.0
    return x, mask


def variant_options(variant, device="cpu"):
    if variant == "contrast":
        return dict(variant=variant, target=2, contrast_target=1)
    if variant in ("class", "rrr"):
        return dict(variant=variant, target=2)
    return dict(variant=variant, target=torch.tensor([2, 0, 1], device=device))


def assert_matches_reference(
    penalty, reference, model, reference_model=None, gradient_tolerance=1e-9, value_tolerance=1e-9
):
    """The penalty value and its parameter gradients, relative to the reference's."""
    assert relative_error([penalty], [reference]) <= value_tolerance
    reference_model = model if reference_model is None else reference_model
    assert relative_error(
        parameter_gradients(penalty, model), parameter_gradients(reference, reference_model)
    ) <= gradient_tolerance


# --- agreement with the reference ---


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("saliency", ["gradient", "input_x_gradient"])
def test_every_method_matches_float64_reference(device, dims, variant, norm, saliency):
    torch.manual_seed(dims)
    model = tanh_cnn(dims).to(device, torch.float64)
    x, mask = batch(dims, device=device)
    has_mask = torch.tensor([True, False, True], device=device)
    options = dict(variant_options(variant, device), saliency=saliency, norm=norm, dilate=1)
    reference = reference_penalty(model, x, mask, has_mask, **options)
    for method in METHODS:
        ours = gradmask_penalty(model, x, mask, has_mask, method=method, **options)
        torch.testing.assert_close(ours.penalty, reference, rtol=1e-12, atol=0)
        assert_matches_reference(ours.penalty, reference, model, gradient_tolerance=TOLERANCE[method])


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("dilate", [0, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dilation_and_reduction_match_float64_reference(device, dims, dilate, reduction):
    torch.manual_seed(dims)
    model = tanh_cnn(dims).to(device, torch.float64)
    x, mask = batch(dims, device=device)
    has_mask = torch.tensor([1.0, 1.0, 0.0], device=device)
    options = dict(dilate=dilate, reduction=reduction)
    reference = reference_penalty(model, x, mask, has_mask, **options)
    ours = gradmask_penalty(model, x, mask, has_mask, **options)
    assert_matches_reference(ours.penalty, reference, model)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("norm", NORMS)
def test_finite_difference_float32_gradient_error(dims, variant, norm):
    # Measured relative error of the float32 parameter gradient vs the float64
    # reference over 270 cases (these x 2 saliencies x 5 seeds): finite_difference
    # median 4.5e-4, worst 3.1e-3; exact worst 4.6e-7. The value is within 2.1e-7.
    torch.manual_seed(dims)
    model = tanh_cnn(dims)
    x, mask = batch(dims, dtype=torch.float32)
    options = dict(variant_options(variant), norm=norm, dilate=1)
    ours = gradmask_penalty(model, x, mask, method="finite_difference", **options)
    model64 = copy.deepcopy(model).double()
    reference = reference_penalty(model64, x.double(), mask.double(), **options)
    assert ours.penalty.dtype == torch.float32
    assert_matches_reference(
        ours.penalty, reference, model, model64, gradient_tolerance=1e-2, value_tolerance=1e-6
    )


# --- expected gradients ---


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("variant", ["contrast", "rrr"])
def test_expected_gradients_match_reference_with_the_same_draws(device, dims, variant):
    torch.manual_seed(dims)
    model = tanh_cnn(dims).to(device, torch.float64)
    x, mask = batch(dims, device=device)
    baseline, alpha = path_draws(model, x, mask, seed=5, dilate=1)
    options = dict(variant=variant, saliency="expected_gradients", dilate=1)
    reference = reference_penalty(model, x, mask, baseline=baseline, alpha=alpha, **options)
    for method in METHODS:
        torch.manual_seed(5)
        ours = gradmask_penalty(model, x, mask, method=method, **options)
        assert_matches_reference(ours.penalty, reference, model, gradient_tolerance=TOLERANCE[method])


def linear_model_and_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, N_CLASSES)).double()
    return model, model[1].weight[2].detach().reshape(2, 4)


@pytest.mark.parametrize("n", [1, 2])
def test_expected_gradients_default_reference_differs_from_the_input_outside_the_mask(n):
    # Linear model: whatever alpha is drawn, the attribution is W_t * (x - x') and the
    # default x' is x inside the (dilated) mask and 0 outside, so it is W_t * x there.
    model, weight = linear_model_and_weight()
    x = torch.randn(n, 2, 4, dtype=torch.float64)
    mask = torch.zeros(n, 1, 4, dtype=torch.float64)
    mask[..., 0] = 1.0
    expected = ((1 - dilate_reference(mask, 1)) * x * weight).pow(2).sum()
    for seed in range(3):
        torch.manual_seed(seed)
        penalty = gradmask_penalty(
            model, x, mask, variant="class", target=2, saliency="expected_gradients",
            reduction="sum", dilate=1,
        ).penalty
        assert penalty > 0
        torch.testing.assert_close(penalty, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("baselines", [0.5, "broadcast", "one image"])
def test_expected_gradients_with_a_fixed_reference(baselines):
    model, weight = linear_model_and_weight()
    x = torch.randn(1, 2, 4, dtype=torch.float64)
    mask = torch.zeros(1, 1, 4, dtype=torch.float64)
    reference = {
        0.5: torch.full_like(x, 0.5),
        "broadcast": torch.linspace(-1, 1, 4, dtype=torch.float64),
        "one image": torch.randn(1, 2, 4, dtype=torch.float64),
    }[baselines]
    given = 0.5 if baselines == 0.5 else reference
    penalty = gradmask_penalty(
        model, x, mask, variant="class", target=2, saliency="expected_gradients",
        baselines=given, reduction="sum",
    ).penalty
    torch.testing.assert_close(penalty, ((x - reference) * weight).pow(2).sum(), rtol=1e-12, atol=0)


def test_expected_gradients_draw_each_reference_from_the_reference_images():
    model, weight = linear_model_and_weight()
    x = torch.randn(2, 2, 4, dtype=torch.float64)
    mask = torch.zeros(2, 1, 4, dtype=torch.float64)
    pool = torch.randn(3, 2, 4, dtype=torch.float64)
    candidates = torch.stack([
        ((x[0] - pool[i]) * weight).pow(2).sum() + ((x[1] - pool[j]) * weight).pow(2).sum()
        for i, j in itertools.product(range(3), repeat=2)
    ])
    drawn = set()
    for seed in range(12):
        torch.manual_seed(seed)
        penalty = gradmask_penalty(
            model, x, mask, variant="class", target=2, saliency="expected_gradients",
            baselines=pool, reduction="sum",
        ).penalty
        distances = (candidates - penalty).abs()
        assert distances.min() <= 1e-12 * candidates.max()
        drawn.add(int(distances.argmin()))
    assert len(drawn) > 3  # references are drawn per example, not one for the batch


@pytest.mark.parametrize("n", [1, 2])
def test_expected_gradients_never_vanish_by_pairing_an_example_with_itself(n):
    # With references taken from the batch, N=1 always gave a zero penalty and N=2
    # about half the time; with the default reference it never does.
    torch.manual_seed(0)
    model = tanh_cnn(2).double()
    x, mask = batch(2, n=n)
    for seed in range(20):
        torch.manual_seed(seed)
        penalty = gradmask_penalty(model, x, mask, saliency="expected_gradients").penalty
        assert penalty > 0


# --- has_mask and mask forms ---


@pytest.mark.parametrize("method", METHODS)
def test_examples_without_a_mask_contribute_nothing(device, method):
    torch.manual_seed(0)
    model = tanh_cnn(2).to(device, torch.float64)
    x, mask = batch(2, device=device)
    has_mask = torch.tensor([True, False, True], device=device)
    ours = gradmask_penalty(model, x, mask, has_mask, method=method)
    kept = gradmask_penalty(model, x[[0, 2]], mask[[0, 2]], method=method)
    torch.testing.assert_close(ours.penalty, kept.penalty, rtol=1e-12, atol=0)
    assert relative_error(
        parameter_gradients(ours.penalty, model), parameter_gradients(kept.penalty, model)
    ) <= 1e-6


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_without_masks_gives_finite_zero_penalty_and_gradients(method, norm, dtype):
    torch.manual_seed(0)
    model = tanh_cnn(2).to(dtype)
    x, mask = batch(2, dtype=dtype)
    x = 1000 * x  # a CT scale (Hounsfield units)
    has_mask = torch.zeros(3, dtype=torch.bool)
    for reduction in ["mean", "sum"]:
        ours = gradmask_penalty(
            model, x, mask, has_mask, norm=norm, reduction=reduction, method=method
        )
        assert ours.penalty.item() == 0
        for gradient in parameter_gradients(ours.penalty, model):
            assert torch.equal(gradient, torch.zeros_like(gradient))


def test_one_channel_mask_applies_to_every_input_channel(device):
    torch.manual_seed(0)
    model = tanh_cnn(2).to(device, torch.float64)
    x, mask = batch(2, device=device)
    shared = gradmask_penalty(model, x, mask, dilate=1).penalty
    per_channel = gradmask_penalty(model, x, mask.expand(-1, 2, -1, -1), dilate=1).penalty
    torch.testing.assert_close(shared, per_channel, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_per_channel_mask_matches_reference(device, dims):
    torch.manual_seed(dims)
    model = tanh_cnn(dims).to(device, torch.float64)
    x, mask = batch(dims, mask_channels=2, device=device)
    reference = reference_penalty(model, x, mask, norm="l1", dilate=1)
    ours = gradmask_penalty(model, x, mask, norm="l1", dilate=1)
    assert_matches_reference(ours.penalty, reference, model)


def test_bool_mask_equals_its_float_values(device):
    torch.manual_seed(0)
    model = tanh_cnn(3).to(device, torch.float64)
    x, mask = batch(3, device=device)
    lesion = mask > 0.3
    as_bool = gradmask_penalty(model, x, lesion, dilate=1).penalty
    as_float = gradmask_penalty(model, x, lesion.double(), dilate=1).penalty
    assert torch.equal(as_bool, as_float)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("corner", [False, True])
def test_dilation_is_a_square_of_radius_clipped_at_the_border(dims, radius, corner):
    # Saliency |z_2 - z_0| of this linear model is +-1 everywhere, so the penalty
    # counts the pixels outside the dilated single-pixel lesion.
    side = 7
    model = nn.Sequential(nn.Flatten(), nn.Linear(side**dims, N_CLASSES, bias=False)).double()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[2] = 1.0
    x = torch.randn(1, 1, *[side] * dims, dtype=torch.float64)
    mask = torch.zeros_like(x)
    mask[(0, 0, *[0 if corner else side // 2] * dims)] = 1.0
    penalty = gradmask_penalty(model, x, mask, target=2, dilate=radius, reduction="sum").penalty
    covered = (radius + 1 if corner else 2 * radius + 1) ** dims
    assert penalty.item() == side**dims - covered


# --- dropout and batch norm in training mode ---


def rng_states(device):
    cuda = [torch.cuda.get_rng_state()] if torch.device(device).type == "cuda" else []
    return [torch.get_rng_state(), *cuda]


@pytest.mark.parametrize("saliency", SALIENCIES)
def test_dropout_masks_are_shared_by_all_passes(device, saliency):
    torch.manual_seed(0)
    model = tanh_cnn(2, 2, nn.Dropout(0.5)).to(device, torch.float64)
    x, mask = batch(2, device=device)
    baseline, alpha = (
        path_draws(model, x, mask, seed=7) if saliency == "expected_gradients" else (None, None)
    )
    torch.manual_seed(7)  # the reference's single forward draws the first pass's masks
    reference = reference_penalty(model, x, mask, saliency=saliency, baseline=baseline, alpha=alpha)
    for method in METHODS:
        torch.manual_seed(7)
        ours = gradmask_penalty(model, x, mask, saliency=saliency, method=method)
        assert_matches_reference(ours.penalty, reference, model, gradient_tolerance=TOLERANCE[method])
    torch.manual_seed(8)
    other_masks = gradmask_penalty(model, x, mask, saliency=saliency).penalty
    assert relative_error([other_masks], [reference]) > 1e-3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("saliency", SALIENCIES)
def test_random_state_after_a_call_is_that_of_one_forward_pass(device, method, saliency):
    torch.manual_seed(0)
    model = tanh_cnn(2, 2, nn.Dropout(0.5)).to(device, torch.float64)
    x, mask = batch(2, device=device)
    if saliency == "expected_gradients":  # then the path points are drawn after it
        path_draws(model, x, mask, seed=3)
    else:
        torch.manual_seed(3)
        model(x)
    expected = rng_states(device)
    torch.manual_seed(3)
    gradmask_penalty(model, x, mask, saliency=saliency, method=method)
    assert all(map(torch.equal, rng_states(device), expected))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("saliency", SALIENCIES)
def test_batch_norm_in_training_uses_batch_coupled_gradient(device, method, saliency):
    torch.manual_seed(0)
    model = tanh_cnn(2, 2, nn.BatchNorm2d(3)).to(device, torch.float64)
    x, mask = batch(2, device=device)
    plain, twin = copy.deepcopy(model), copy.deepcopy(model)
    baseline, alpha = (
        path_draws(copy.deepcopy(model), x, mask, seed=4)
        if saliency == "expected_gradients"
        else (None, None)
    )
    # d(sum_b s_b)/dx_b: the reference differentiates the summed saliency.
    reference = reference_penalty(twin, x, mask, saliency=saliency, baseline=baseline, alpha=alpha)
    torch.manual_seed(4)
    with pytest.warns(UserWarning, match="BatchNorm in training mode"):
        ours = gradmask_penalty(model, x, mask, saliency=saliency, method=method)
    assert_matches_reference(ours.penalty, reference, model, twin, gradient_tolerance=TOLERANCE[method])
    plain(x)
    for ours_buffer, plain_buffer in zip(model.buffers(), plain.buffers()):
        assert torch.equal(ours_buffer, plain_buffer)


def test_failing_call_leaves_batch_norm_statistics_unchanged():
    torch.manual_seed(0)
    model = tanh_cnn(2, 2, nn.BatchNorm2d(3)).double()
    x, mask = batch(2)
    saved = snapshot(model.buffers())
    with pytest.warns(UserWarning, match="BatchNorm"), pytest.raises(ValueError, match="^target must be in"):
        gradmask_penalty(model, x, mask, target=5)
    assert_same_values(model.buffers(), saved)


# --- warnings ---


def test_class_variant_warns_on_a_two_logit_model():
    torch.manual_seed(0)
    model = tanh_cnn(2, n_classes=2).double()
    x, mask = batch(2)
    with pytest.warns(UserWarning, match="2-logit"):
        gradmask_penalty(model, x, mask, variant="class", target=1)


def test_no_warning_for_class_on_three_logits_or_batch_norm_in_eval():
    torch.manual_seed(0)
    model = tanh_cnn(2, 2, nn.BatchNorm2d(3)).double().eval()
    x, mask = batch(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradmask_penalty(model, x, mask, variant="class", target=2)


def test_contrast_on_a_one_logit_model_raises():
    model = tanh_cnn(2, n_classes=1).double()
    x, mask = batch(2)
    with pytest.raises(ValueError, match="variant='contrast' needs at least 2 logits"):
        gradmask_penalty(model, x, mask, target=0)


def test_rrr_on_a_one_logit_model_raises():
    model = tanh_cnn(2, n_classes=1).double()
    x, mask = batch(2)
    with pytest.raises(ValueError, match="^variant='rrr' needs at least 2 logits"):
        gradmask_penalty(model, x, mask, variant="rrr")


def test_rrr_ignores_target_and_contrast_target():
    torch.manual_seed(0)
    model = tanh_cnn(2).double()
    x, mask = batch(2)
    default = gradmask_penalty(model, x, mask, variant="rrr").penalty
    ignored = gradmask_penalty(
        model, x, mask, variant="rrr", target=torch.tensor([7, -1, 0.5]), contrast_target=9
    ).penalty
    assert torch.equal(default, ignored)


# --- properties over shapes and options ---


@given(
    dims=st.integers(1, 3),
    n=st.integers(1, 4),
    channels=st.integers(1, 3),
    per_channel_mask=st.booleans(),
    variant=st.sampled_from(VARIANTS),
    norm=st.sampled_from(NORMS),
    reduction=st.sampled_from(["mean", "sum"]),
    saliency=st.sampled_from(SALIENCIES),
    method=st.sampled_from(METHODS),
    dilate=st.integers(0, 2),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    scale=st.sampled_from([1.0, 1000.0]),
    seed=st.integers(0, 2**16),
)
def test_penalty_properties(
    dims, n, channels, per_channel_mask, variant, norm, reduction, saliency, method,
    dilate, dtype, scale, seed,
):
    torch.manual_seed(seed)
    model = tanh_cnn(dims, channels).to(dtype)
    x, mask = batch(dims, n, channels, channels if per_channel_mask else 1, dtype=dtype)
    x = scale * x
    target = torch.randint(N_CLASSES, (n,)) if variant == "target" else 2
    options = dict(
        variant=variant, target=target, norm=norm, reduction=reduction,
        saliency=saliency, method=method, dilate=dilate,
    )
    outputs, penalty = gradmask_penalty(model, x, mask, **options)
    assert penalty.shape == () and penalty.dtype == dtype
    assert torch.isfinite(penalty) and penalty >= 0
    assert torch.equal(outputs, model(x))
    assert all(g.isfinite().all() for g in parameter_gradients(penalty, model))
    everywhere_lesion = gradmask_penalty(model, x, torch.ones_like(mask), **options).penalty
    assert 0 <= everywhere_lesion <= n * torch.finfo(dtype).eps  # l2 keeps eps in its sqrt
    assert all(g.isfinite().all() for g in parameter_gradients(everywhere_lesion, model))


# --- errors, and nothing the caller passed is changed ---


def with_first_entry(tensor, value):
    changed = tensor.clone()
    changed.view(-1)[0] = value
    return changed


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def assert_same_values(tensors, saved):
    assert all(torch.equal(t.detach(), s) for t, s in zip(tensors, saved))


BAD_ARGUMENTS = {
    "mask with 2 of 3 channels": (
        lambda x, m: dict(mask=m.expand(-1, 2, -1, -1)), ValueError, "^mask must have shape"
    ),
    "mask spatial shape": (
        lambda x, m: dict(mask=m[..., :-1]), ValueError, "^mask must have shape"
    ),
    "mask batch size": (lambda x, m: dict(mask=m[:1]), ValueError, "^mask must have shape"),
    "mask without channels": (lambda x, m: dict(mask=m[:, 0]), ValueError, "^mask must have shape"),
    "mask NaN": (lambda x, m: dict(mask=with_first_entry(m, math.nan)), ValueError, "^mask values"),
    "mask Inf": (lambda x, m: dict(mask=with_first_entry(m, math.inf)), ValueError, "^mask values"),
    "mask above 1": (lambda x, m: dict(mask=with_first_entry(m, 1.5)), ValueError, "^mask values"),
    "mask below 0": (lambda x, m: dict(mask=with_first_entry(m, -0.5)), ValueError, "^mask values"),
    "mask integer 2": (
        lambda x, m: dict(mask=2 * (m > 0.3).long()), ValueError, "^mask of integer dtype torch.int64 must hold only 0 and 1"
    ),
    "mask complex": (lambda x, m: dict(mask=m.to(torch.complex128)), TypeError, "^mask must be bool, integer"),
    "baselines without expected_gradients": (
        lambda x, m: dict(baselines=0.0), ValueError, "^baselines are the references of saliency='expected_gradients'"
    ),
    "baselines shape": (
        lambda x, m: dict(saliency="expected_gradients", baselines=x[:, :1]), ValueError, "^baselines must broadcast"
    ),
    "baselines dtype": (
        lambda x, m: dict(saliency="expected_gradients", baselines=x.float()), TypeError, "^baselines must have the inputs' dtype"
    ),
    "baselines NaN": (
        lambda x, m: dict(saliency="expected_gradients", baselines=with_first_entry(x, math.nan)), ValueError, "^baselines holds NaN"
    ),
    "baselines list": (
        lambda x, m: dict(saliency="expected_gradients", baselines=[0.0]), TypeError, "^baselines must be None, a number or a Tensor"
    ),
    "unknown option": (lambda x, m: dict(lambda_=1.0), TypeError, "^unknown GradMask option 'lambda_'"),
    "mask list": (lambda x, m: dict(mask=m.tolist()), TypeError, "^mask must be a Tensor"),
    "inputs integer": (
        lambda x, m: dict(inputs=x.long()), TypeError, "^inputs must have a floating-point"
    ),
    "inputs without spatial dims": (
        lambda x, m: dict(inputs=x.flatten(1)), ValueError, "^inputs must be one Tensor"
    ),
    "inputs list": (lambda x, m: dict(inputs=x.tolist()), TypeError, "^inputs must be a Tensor"),
    "inputs tuple of two": (
        lambda x, m: dict(inputs=(x, x)), ValueError, "^inputs must be one Tensor .* tuple of 2"
    ),
    "target too large": (lambda x, m: dict(target=3), ValueError, r"^target must be in \[0, 3\)"),
    "target negative": (lambda x, m: dict(target=-1), ValueError, r"^target must be in \[0, 3\)"),
    "target labels out of range": (
        lambda x, m: dict(variant="target", target=torch.tensor([0, 3])), ValueError, "^target labels must be in"
    ),
    "target float labels": (
        lambda x, m: dict(variant="target", target=torch.tensor([0.0, 1.0])), TypeError, "^target must be an int or"
    ),
    "target labels shape": (
        lambda x, m: dict(variant="target", target=torch.tensor([0, 1, 2])), ValueError, "^target must have shape"
    ),
    "target variant with int": (
        lambda x, m: dict(variant="target", target=1), ValueError, "per-example labels: pass target"
    ),
    "contrast_target equal to target": (
        lambda x, m: dict(target=2, contrast_target=2), ValueError, "^contrast_target must differ"
    ),
    "contrast_target among per-example targets": (
        lambda x, m: dict(target=torch.tensor([2, 0])), ValueError, "^contrast_target must differ"
    ),
    "contrast_target out of range": (
        lambda x, m: dict(contrast_target=3), ValueError, "^contrast_target must be an int in"
    ),
    "unknown variant": (lambda x, m: dict(variant="eq1"), ValueError, "^variant must be one of"),
    "unknown saliency": (
        lambda x, m: dict(saliency="integrated_gradients"), ValueError, "^saliency must be one of"
    ),
    "unknown norm": (lambda x, m: dict(norm="l3"), ValueError, "^norm must be one of"),
    "unknown reduction": (
        lambda x, m: dict(reduction="none"), ValueError, "^reduction must be one of"
    ),
    "unknown method": (
        lambda x, m: dict(method="forward_over_reverse"), ValueError, "^method must be one of"
    ),
    "dilate negative": (lambda x, m: dict(dilate=-1), ValueError, "^dilate must be an int >= 0"),
    "dilate float": (lambda x, m: dict(dilate=1.5), ValueError, "^dilate must be an int >= 0"),
    "dilate bool": (lambda x, m: dict(dilate=True), ValueError, "^dilate must be an int >= 0"),
    "has_mask shape": (
        lambda x, m: dict(has_mask=torch.ones(3)), ValueError, r"^has_mask must be a .* \(2,\)"
    ),
    "has_mask list": (
        lambda x, m: dict(has_mask=[True, True]), ValueError, r"^has_mask must be a .* \(2,\)"
    ),
    "has_mask value 2": (
        lambda x, m: dict(has_mask=torch.tensor([0.0, 2.0])), ValueError, "^has_mask must be bool or hold only 0"
    ),
    "has_mask NaN": (
        lambda x, m: dict(has_mask=torch.tensor([1.0, math.nan])), ValueError, "^has_mask must be bool or hold only 0"
    ),
}


@pytest.mark.parametrize("change, error, message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_argument_raises_naming_it_and_changes_nothing(change, error, message):
    torch.manual_seed(0)
    model = tanh_cnn(2, 3, nn.Dropout(0.2)).double()
    x, mask = batch(2, n=2, channels=3)
    x.requires_grad_()
    state = ModelState(model, x, mask)
    saved = snapshot([x, mask, *model.parameters()])
    arguments = dict(forward_func=model, inputs=x, mask=mask)
    arguments.update(change(x.detach(), mask))
    with pytest.raises(error, match=message):
        gradmask_penalty(**arguments)
    state.assert_unchanged()
    assert_same_values([x, mask, *model.parameters()], saved)
    assert x.grad is None and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "option, value",
    [("variant", "eq2"), ("saliency", "smoothgrad"), ("norm", "linf"), ("reduction", None),
     ("method", "double_backprop"), ("dilate", -2)],
)
def test_module_rejects_unknown_options_when_built(option, value):
    with pytest.raises(ValueError, match=f"^{option} must be"):
        GradMask(tanh_cnn(2), **{option: value})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mask_or_has_mask_on_another_device_raises():
    model = tanh_cnn(2).double()
    x, mask = batch(2)
    with pytest.raises(ValueError, match="^mask is on cuda"):
        gradmask_penalty(model, x, mask.cuda())
    with pytest.raises(ValueError, match="^has_mask is on cuda"):
        gradmask_penalty(model, x, mask, torch.ones(3, device="cuda"))


@pytest.mark.parametrize("method, needs", [("exact", "double backward"), ("forward_mode", "forward-mode AD")])
def test_compiled_model_with_exact_or_forward_mode_raises(method, needs):
    model = tanh_cnn(2).double()
    x, mask = batch(2)
    compiled = torch.compile(model, backend="aot_eager")
    state = ModelState(model, x, mask)
    message = f"^method='{method}' needs {needs}, which torch.compile'd models do not support; use method='finite_difference'"
    with pytest.raises(ValueError, match=message):
        GradMask(compiled, method=method)
    with pytest.raises(ValueError, match=message):
        gradmask_penalty(compiled, x, mask, method=method)
    with pytest.raises(ValueError, match=message):  # a compiled model inside a lambda
        gradmask_penalty(lambda inputs: compiled(inputs), x, mask, method=method)
    state.assert_unchanged()


def test_finite_difference_runs_a_compiled_model():
    torch.manual_seed(0)
    model = tanh_cnn(2).double()
    x, mask = batch(2)
    compiled = torch.compile(model, backend="aot_eager")
    ours = gradmask_penalty(compiled, x, mask, method="finite_difference")
    reference = reference_penalty(model, x, mask)
    assert_matches_reference(ours.penalty, reference, model, gradient_tolerance=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("saliency", SALIENCIES)
def test_a_call_changes_nothing_the_caller_passed(device, method, saliency):
    torch.manual_seed(0)
    model = tanh_cnn(2, 2, nn.Dropout(0.2)).to(device, torch.float64)
    model[0].eval()
    x, mask = batch(2, device=device)
    x.requires_grad_()
    has_mask = torch.tensor([1.0, 0.0, 1.0], device=device)
    state = ModelState(model, x, mask, has_mask)
    saved = snapshot([x, mask, has_mask, *model.parameters()])
    gradmask_penalty(model, x, mask, has_mask, method=method, saliency=saliency)
    state.assert_unchanged()
    assert_same_values([x, mask, has_mask, *model.parameters()], saved)
    assert x.grad is None and all(p.grad is None for p in model.parameters())


# --- the module, the task loss and extra arguments ---


def test_module_matches_reference_and_overrides_target_per_call(device):
    torch.manual_seed(0)
    model = tanh_cnn(2).to(device, torch.float64)
    x, mask = batch(2, device=device)
    configured = torch.tensor([0, 1, 2], device=device)
    gradmask = GradMask(model, variant="target", target=configured, norm="l1", dilate=1)
    assert [id(p) for p in gradmask.parameters()] == [id(p) for p in model.parameters()]
    assert "variant='target'" in repr(gradmask) and "norm='l1'" in repr(gradmask)
    for call_target, labels in [(None, configured), (configured.flip(0), configured.flip(0))]:
        result = gradmask(x, mask, target=call_target)
        assert isinstance(result, GradMaskOutput)
        reference = reference_penalty(
            model, x, mask, variant="target", target=labels, norm="l1", dilate=1
        )
        assert relative_error([result.penalty], [reference]) <= 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_outputs_carry_the_graph_for_the_task_loss(device, method):
    torch.manual_seed(0)
    model = tanh_cnn(2).to(device, torch.float64)
    x, mask = batch(2, device=device)
    labels = torch.tensor([0, 1, 2], device=device)
    outputs, _ = gradmask_penalty(model, x, mask, method=method)
    ours = parameter_gradients(F.cross_entropy(outputs, labels), model)
    plain = parameter_gradients(F.cross_entropy(model(x), labels), model)
    assert relative_error(ours, plain) <= 1e-12


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("extra", [2.0, (2.0,)])
def test_additional_forward_args_reach_the_model(method, extra):
    torch.manual_seed(0)
    model = tanh_cnn(2).double()
    x, mask = batch(2)
    ours = gradmask_penalty(
        lambda inputs, scale: scale * model(inputs), x, mask,
        additional_forward_args=extra, method=method,
    )
    reference = reference_penalty(lambda inputs: 2.0 * model(inputs), x, mask)
    assert_matches_reference(ours.penalty, reference, model, gradient_tolerance=1e-4)


# --- gradcheck ---


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("saliency", SALIENCIES)
@pytest.mark.parametrize("norm", NORMS)
def test_penalty_gradient_passes_gradcheck(device, method, saliency, norm):
    torch.manual_seed(0)
    x, mask = batch(1, n=2, channels=1, device=device)
    parameter = dict(device=device, dtype=torch.float64, requires_grad=True)
    conv = torch.randn(2, 1, 3, **parameter)
    head = torch.randn(N_CLASSES, 2 * SIDE[1], **parameter)

    def penalty(conv, head):
        def forward(inputs):
            return F.linear(torch.tanh(F.conv1d(inputs, conv, padding=1)).flatten(1), head)

        torch.manual_seed(1)  # the same expected-gradients path in every evaluation
        return gradmask_penalty(
            forward, x, mask, saliency=saliency, norm=norm, method=method, dilate=1
        ).penalty

    assert gradcheck(penalty, (conv, head))
    if method == "exact":  # the other methods' surrogates are not meant to have the Hessian
        assert gradgradcheck(penalty, (conv, head))
