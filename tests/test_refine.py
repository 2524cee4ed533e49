import numpy as np
import pytest
import scipy.ndimage
import torch
from hypothesis import given
from hypothesis import strategies as st

from captum_gradmask.refine import box_mean, refine_mask

TIE_MARGIN = 1e-9  # masks are compared only where the reference is off the threshold


def scipy_smoothed_saliency(attributions, kernel_size, n_passes, clip_quantile=None):
    """The normalised smoothed map of refine_mask, written with scipy (float64)."""
    saliency = np.abs(attributions.double().cpu().numpy()).max(axis=1, keepdims=True)
    if clip_quantile is not None:
        flat = saliency.reshape(len(saliency), -1)
        clip = np.quantile(flat, clip_quantile, axis=1, method="inverted_cdf")
        saliency = np.minimum(saliency, clip.reshape(-1, *[1] * (saliency.ndim - 1)))
    saliency = _scipy_divide_by_max(saliency)
    box = (1, 1) + (kernel_size,) * (saliency.ndim - 2)
    for _ in range(n_passes):
        saliency = scipy.ndimage.uniform_filter(saliency, size=box, mode="constant", cval=0.0)
    return _scipy_divide_by_max(saliency)


def _scipy_divide_by_max(saliency):
    peak = saliency.reshape(len(saliency), -1).max(axis=1).reshape(-1, *[1] * (saliency.ndim - 1))
    return np.divide(saliency, peak, out=np.zeros_like(saliency), where=peak > 0)


def assert_masks_match(mask, reference_map, level):
    assert mask.dtype == torch.bool and mask.shape == reference_map.shape
    decided = np.abs(reference_map - level) > TIE_MARGIN
    np.testing.assert_array_equal(mask.cpu().numpy()[decided], (reference_map >= level)[decided])


@st.composite
def refinement_cases(draw, n_spatial):
    shape = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
        *[draw(st.integers(1, 13 if n_spatial == 2 else 7)) for _ in range(n_spatial)],
    )
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    attributions = torch.randn(shape, generator=generator, dtype=torch.float64)
    if draw(st.booleans()):  # sparse maps, as from ReLU networks, with all-zero samples
        attributions *= torch.rand(shape, generator=generator, dtype=torch.float64) < 0.1
    options = dict(
        kernel_size=draw(st.sampled_from([1, 3, 5, 7, 9])),
        n_passes=draw(st.integers(0, 3)),
        threshold=draw(st.floats(0.01, 1.0)),
    )
    return attributions, options


@pytest.mark.parametrize("n_spatial", [2, 3])
@given(data=st.data())
def test_matches_scipy_reference(n_spatial, data):
    attributions, options = data.draw(refinement_cases(n_spatial))
    mask = refine_mask(attributions, **options)
    reference = scipy_smoothed_saliency(attributions, options["kernel_size"], options["n_passes"])
    assert_masks_match(mask, reference, options["threshold"])


@pytest.mark.parametrize("shape, kernel_size", [((2, 3, 17, 11), 5), ((2, 2, 5, 9, 8), 3), ((3, 1, 40), 7)])
def test_box_mean_matches_scipy_uniform_filter(shape, kernel_size):
    values = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    box = (1, 1) + (kernel_size,) * (len(shape) - 2)
    reference = values.numpy()
    for _ in range(3):
        reference = scipy.ndimage.uniform_filter(reference, size=box, mode="constant")
    np.testing.assert_allclose(box_mean(values, kernel_size, 3).numpy(), reference, atol=1e-13)


def test_paper_setting_on_a_blob():
    """One bright blob: 3 passes of 11x11 give a compact mask around it."""
    attributions = torch.zeros(1, 1, 64, 64, dtype=torch.float64)
    attributions[0, 0, 30:34, 20:24] = 1.0
    mask = refine_mask(attributions)
    rows, columns = torch.nonzero(mask[0, 0], as_tuple=True)
    assert 28 <= rows.float().mean() <= 34 and 19 <= columns.float().mean() <= 25
    assert mask[0, 0, 31, 21] and not mask[0, 0, 0, 0] and not mask[0, 0, 31, 50]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_and_devices(device, dtype):
    attributions = torch.randn(3, 2, 24, 20, generator=torch.Generator().manual_seed(1))
    mask = refine_mask(attributions.to(device, dtype), kernel_size=5)
    assert mask.dtype == torch.bool and mask.device.type == torch.device(device).type
    assert mask.shape == (3, 1, 24, 20)
    reference = scipy_smoothed_saliency(attributions.to(dtype), 5, 3)
    decided = np.abs(reference - 0.5) > 1e-3  # float32 arithmetic inside
    np.testing.assert_array_equal(mask.cpu().numpy()[decided], (reference >= 0.5)[decided])


def test_batch_equals_per_sample_and_input_unchanged():
    attributions = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    before = attributions.clone()
    batch = refine_mask(attributions, kernel_size=3, n_passes=2, threshold=0.3)
    for b in range(4):
        single = refine_mask(attributions[b : b + 1], kernel_size=3, n_passes=2, threshold=0.3)
        assert torch.equal(batch[b : b + 1], single)
    assert torch.equal(attributions, before)


def test_all_zero_map_gives_empty_mask(device):
    attributions = torch.zeros(3, 1, 8, 8, device=device)
    attributions[1, 0, 4, 4] = -2.0
    for threshold_mode in ("value", "quantile"):
        mask = refine_mask(attributions, kernel_size=3, threshold_mode=threshold_mode)
        assert not mask[0].any() and not mask[2].any()
        assert mask[1, 0, 4, 4]


def test_p99_clips_outliers_before_smoothing():
    generator = torch.Generator().manual_seed(3)
    attributions = torch.rand(2, 1, 30, 30, generator=generator, dtype=torch.float64)
    attributions[:, 0, 3, 3] = 1e4  # one outlier would dominate a plain max
    mask = refine_mask(attributions, kernel_size=5, normalize="p99")
    reference = scipy_smoothed_saliency(attributions, 5, 3, clip_quantile=0.99)
    assert_masks_match(mask, reference, 0.5)
    assert mask.sum() > refine_mask(attributions, kernel_size=5).sum()


@given(seed=st.integers(0, 2**31), quantile=st.floats(0.05, 1.0))
def test_quantile_threshold_mode(seed, quantile):
    attributions = torch.randn(2, 2, 12, 10, generator=torch.Generator().manual_seed(seed))
    attributions = attributions.double()
    mask = refine_mask(attributions, kernel_size=3, threshold=quantile, threshold_mode="quantile")
    smoothed = scipy_smoothed_saliency(attributions, 3, 3)
    flat = smoothed.reshape(2, -1)
    level = np.quantile(flat, quantile, axis=1, method="inverted_cdf").reshape(2, 1, 1, 1)
    expected = (smoothed >= level) & (smoothed > 0)
    decided = np.abs(smoothed - level) > TIE_MARGIN
    np.testing.assert_array_equal(mask.numpy()[decided], expected[decided])
    assert (mask.reshape(2, -1).float().mean(1) >= 1 - quantile - 1e-9).all()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"kernel_size": 4}, ValueError, "kernel_size must be a positive odd int, got 4"),
        ({"kernel_size": 0}, ValueError, "kernel_size"),
        ({"kernel_size": -3}, ValueError, "kernel_size"),
        ({"kernel_size": 3.0}, TypeError, "kernel_size must be an int"),
        ({"kernel_size": True}, TypeError, "kernel_size"),
        ({"n_passes": -1}, ValueError, "n_passes must be >= 0"),
        ({"n_passes": 1.5}, TypeError, "n_passes must be an int"),
        ({"threshold": 0.0}, ValueError, r"threshold must be in \(0, 1\], got 0.0"),
        ({"threshold": 1.5}, ValueError, "threshold"),
        ({"threshold": float("nan")}, ValueError, "threshold"),
        ({"threshold": "0.5"}, TypeError, "threshold must be a float"),
        ({"threshold": True}, TypeError, "threshold"),
        ({"normalize": "l2"}, ValueError, "normalize must be one of"),
        ({"threshold_mode": "relative"}, ValueError, "threshold_mode must be one of"),
    ],
)
def test_option_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        refine_mask(torch.rand(1, 1, 8, 8), **kwargs)


@pytest.mark.parametrize(
    "attributions, error, message",
    [
        (np.ones((1, 1, 4, 4)), TypeError, "attributions must be a Tensor, got ndarray"),
        (torch.ones(1, 1, 4, 4, dtype=torch.long), TypeError, "floating-point dtype, got torch.int64"),
        (torch.ones(4, 4), ValueError, r"\(N, C, \*spatial\).*got shape \(4, 4\)"),
        (torch.ones(1, 1, 2, 2, 2, 2), ValueError, "3 to 5 dimensions"),
        (torch.ones(0, 1, 4, 4), ValueError, "attributions is empty"),
        (torch.tensor([[[[1.0, float("nan")]]]]), ValueError, "NaN or infinite"),
        (torch.tensor([[[[1.0, -float("inf")]]]]), ValueError, "NaN or infinite"),
    ],
)
def test_attribution_errors(attributions, error, message):
    with pytest.raises(error, match=message):
        refine_mask(attributions)
