"""Autocast, half-precision inputs and torch.compile, checked against float32.

Errors are relative, |low - float32| / |float32| in the Frobenius norm, unless said
otherwise. Each tolerance was measured on CPU in bfloat16 (eps 2**-8, the coarser half
type) over seeds 0-9 and is set above the worst case; float16 (eps 2**-11) is held
to the same bounds.
"""

import contextlib
import copy

import pytest
import torch
from captum.attr import Saliency
from torch import nn

from captum_gradmask import IterativeUnveiling, MCDropout, gradmask_penalty, refine_mask

# GradMask penalty value: measured at most 2.8e-3.
PENALTY_TOLERANCE = 1e-2
# Parameter gradient of the penalty against float32 "exact": measured at most 4.3e-3
# for "exact" and "forward_mode" and 3.4e-2 for "finite_difference" (its step grows to sqrt(eps) of the
# half type, so truncation error adds to rounding).
GRADIENT_TOLERANCE = {"exact": 2e-2, "forward_mode": 2e-2, "finite_difference": 1e-1}
# refine_mask: share of pixels whose mask differs, ties at the threshold; measured
# at most 2.2e-4 for half maps, exactly 0 under autocast (it smooths in float32).
REFINE_DISAGREEMENT = 1e-3
# Unveiling with Saliency: first attributions measured at most 3.9e-3 (relative);
# share of differing mask pixels over 3 iterations at most 2.3e-3 (a pixel that
# differs in one region moves the next ones); scores, logits of size ~0.5, at most
# 2.9e-2 off (absolute) after such a move, 4.6e-3 before.
UNVEILING_ATTRIBUTION_TOLERANCE = 2e-2
UNVEILING_DISAGREEMENT = 1e-2
UNVEILING_SCORE_TOLERANCE = 1e-1
# MCDropout: outputs measured at most 5.3e-3 (relative; 4.2e-3 absolute); the
# uncertainty fields (nats or probabilities, absolute error) at most 1.0e-2.
MC_OUTPUT_TOLERANCE = 2e-2
MC_UNCERTAINTY_TOLERANCE = 3e-2
# Logit margins above this (ten times the largest absolute logit error) are no ties.
MC_TIE_MARGIN = 5e-2

PRECISIONS = [
    pytest.param("autocast", torch.bfloat16, id="autocast-bf16"),
    pytest.param("autocast", torch.float16, id="autocast-fp16"),
    pytest.param("inputs", torch.bfloat16, id="bf16-inputs"),
    pytest.param("inputs", torch.float16, id="fp16-inputs"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def low_precision(device, precision, dtype):
    """(cast, context): ``cast`` turns float32 models and inputs into those of the run,
    which runs inside ``context``."""
    if precision == "autocast":
        if device == "cpu" and dtype == torch.float16:
            pytest.skip("CPU autocast is checked in bfloat16, float16 autocast on CUDA")
        return (lambda obj: obj), torch.autocast(device, dtype=dtype)
    return (lambda obj: copy.deepcopy(obj).to(dtype)), contextlib.nullcontext()


def relative_error(value, reference):
    return ((value.float() - reference).norm() / reference.norm()).item()


def cnn(side, dropout=False):
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.Dropout2d(0.3) if dropout else nn.Identity(),
        nn.Flatten(),
        nn.Linear(4 * side * side, 3),
    ).eval()


def penalty_and_gradient(model, x, mask, method, context):
    with context:
        result = gradmask_penalty(model, x, mask, method=method)
    result.penalty.backward()  # outside autocast, as in a training loop
    return result, torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("method", ["exact", "forward_mode", "finite_difference"])
@pytest.mark.parametrize("precision, dtype", PRECISIONS)
def test_gradmask_penalty(device, precision, dtype, method):
    cast, context = low_precision(device, precision, dtype)
    torch.manual_seed(0)
    model = cnn(8).to(device)
    x = torch.randn(4, 2, 8, 8, device=device)
    mask = torch.zeros(4, 1, 8, 8, device=device)
    mask[..., :4, :4] = 1
    reference, reference_gradient = penalty_and_gradient(
        copy.deepcopy(model), x, mask, "exact", contextlib.nullcontext()
    )
    result, gradient = penalty_and_gradient(cast(model), cast(x), mask, method, context)
    assert result.outputs.dtype == dtype
    assert result.penalty.dtype == cast(x).dtype  # float32 under autocast
    assert torch.isfinite(result.penalty) and torch.isfinite(gradient).all()
    assert relative_error(result.penalty, reference.penalty) < PENALTY_TOLERANCE
    assert relative_error(gradient, reference_gradient) < GRADIENT_TOLERANCE[method]


@pytest.mark.parametrize("precision, dtype", PRECISIONS)
def test_refine_mask(device, precision, dtype):
    cast, context = low_precision(device, precision, dtype)
    torch.manual_seed(0)
    maps = torch.randn(4, 3, 48, 48, device=device)
    with context:
        masks = refine_mask(cast(maps))
    assert masks.dtype == torch.bool
    disagreement = (masks != refine_mask(maps)).float().mean().item()
    assert disagreement <= REFINE_DISAGREEMENT


@pytest.mark.parametrize("precision, dtype", PRECISIONS)
def test_iterative_unveiling(device, precision, dtype):
    cast, context = low_precision(device, precision, dtype)
    torch.manual_seed(0)
    model = cnn(24).to(device)
    x = torch.randn(2, 2, 24, 24, device=device)
    options = dict(target=1, n_iter=3, kernel_size=5)
    reference = IterativeUnveiling(Saliency(model)).unveil(x, **options)
    with context:
        result = IterativeUnveiling(Saliency(cast(model))).unveil(cast(x), **options)
    assert result.scores.dtype == dtype and result.attributions.dtype == cast(x).dtype
    assert torch.isfinite(result.scores).all() and torch.isfinite(result.attributions).all()
    first_attributions = result.attributions[:, 0]
    assert (
        relative_error(first_attributions, reference.attributions[:, 0])
        < UNVEILING_ATTRIBUTION_TOLERANCE
    )
    assert (result.scores.float() - reference.scores).abs().max() < UNVEILING_SCORE_TOLERANCE
    disagreement = (result.masks != reference.masks).float().mean().item()
    assert disagreement <= UNVEILING_DISAGREEMENT


@pytest.mark.parametrize("precision, dtype", PRECISIONS)
def test_mc_dropout(device, precision, dtype):
    cast, context = low_precision(device, precision, dtype)
    torch.manual_seed(0)
    model = cnn(8, dropout=True).to(device)
    x = torch.randn(4, 2, 8, 8, device=device)
    reference_model = MCDropout(model, n_samples=8)
    reference, reference_uncertainty = reference_model(x), reference_model.uncertainty(x)
    mc_model = MCDropout(cast(model), n_samples=8)
    with context:
        outputs, uncertainty = mc_model(cast(x)), mc_model.uncertainty(cast(x))
    assert outputs.dtype == dtype and torch.isfinite(outputs).all()
    assert relative_error(outputs, reference) < MC_OUTPUT_TOLERANCE
    assert all(value.dtype == dtype and torch.isfinite(value).all() for value in uncertainty)
    for name in ("mean", "predictive_entropy", "expected_entropy", "mutual_information"):
        error = (getattr(uncertainty, name).float() - getattr(reference_uncertainty, name)).abs()
        assert error.max() < MC_UNCERTAINTY_TOLERANCE, name
    # The variation ratio counts argmax votes: they agree wherever float32 has no near-tie.
    top_two = reference.topk(2, dim=-1).values
    clear = top_two[..., 0] - top_two[..., 1] > MC_TIE_MARGIN
    assert torch.equal(outputs.argmax(-1)[clear], reference.argmax(-1)[clear])


# --- torch.compile (exact and finite_difference GradMask: tests/test_gradmask.py) ---


def test_mc_dropout_runs_a_compiled_model(device):
    torch.manual_seed(0)
    model = cnn(8, dropout=True).to(device)
    x = torch.randn(4, 2, 8, 8, device=device)
    eager = MCDropout(model, n_samples=6)
    compiled = MCDropout(torch.compile(model), n_samples=6)
    torch.testing.assert_close(compiled(x), eager(x))
    for value, expected in zip(compiled.uncertainty(x), eager.uncertainty(x)):
        torch.testing.assert_close(value, expected)


def test_compiled_refine_mask_matches_eager(device):
    # Compiles with one graph break: the check for non-finite maps reads a bool.
    torch.manual_seed(0)
    maps = torch.randn(4, 3, 48, 48, device=device)
    compiled_refine = torch.compile(refine_mask)
    assert torch.equal(compiled_refine(maps, kernel_size=5), refine_mask(maps, kernel_size=5))


def test_unveiling_refines_a_compiled_models_attributions(device):
    torch.manual_seed(0)
    model = cnn(24).to(device)
    x = torch.randn(2, 2, 24, 24, device=device)
    options = dict(target=1, n_iter=3, kernel_size=5)
    eager = IterativeUnveiling(Saliency(model)).unveil(x, **options)
    compiled = IterativeUnveiling(Saliency(torch.compile(model))).unveil(x, **options)
    assert torch.equal(compiled.masks, eager.masks)
    torch.testing.assert_close(compiled.scores, eager.scores)
    torch.testing.assert_close(compiled.attributions, eager.attributions)


@pytest.mark.parametrize("precision, dtype", PRECISIONS)
def test_forward_mode_with_affine_normalisation(device, precision, dtype):
    # The tangents written out for normalisation layers are scaled by float32 weights
    # under autocast; they must come back in the output's dtype.
    cast, context = low_precision(device, precision, dtype)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
    ).to(device).eval()
    x = torch.randn(4, 2, 8, 8, device=device)
    mask = torch.zeros(4, 1, 8, 8, device=device)
    mask[..., :4, :4] = 1
    _, reference_gradient = penalty_and_gradient(copy.deepcopy(model), x, mask, "exact", contextlib.nullcontext())
    _, gradient = penalty_and_gradient(cast(model), cast(x), mask, "forward_mode", context)
    assert relative_error(gradient, reference_gradient) < GRADIENT_TOLERANCE["forward_mode"]
