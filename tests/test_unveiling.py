import math

import matplotlib
import numpy as np
import pytest
import scipy.ndimage
import torch
from captum.attr import (
    LRP,
    Attribution,
    Deconvolution,
    DeepLift,
    DeepLiftShap,
    FeaturePermutation,
    GradientShap,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NeuronGradient,
    NoiseTunnel,
    Saliency,
)
from captum.attr import visualization as viz
from captum.metrics import infidelity
from torch import nn

from captum_gradmask.contrast_saliency import ContrastSaliency
from captum_gradmask.datasets.regions import multi_region_images
from captum_gradmask.refine import refine_mask
from captum_gradmask.unveiling import IterativeUnveiling, UnveilingResult
from helpers import ModelState

matplotlib.use("Agg")

SIDE = 12


def max_pooling_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )


def blob_images(n: int, device, dtype=torch.float32) -> torch.Tensor:
    """Two bright blobs of different strength per image, on weak noise."""
    images = 0.05 * torch.randn(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    images[:, 0, 2:4, 2:4] += 1.0
    images[:, 0, 8:10, 7:9] += 0.6
    return images.to(device, dtype)


class FixedMap(Attribution):
    """Returns the same map whatever the input; counts its calls."""

    def __init__(self, forward_func, attribution_map):
        super().__init__(forward_func)
        self.attribution_map = attribution_map
        self.calls = 0

    def attribute(self, inputs, target=None, **kwargs):
        self.calls += 1
        return self.attribution_map.clone()


METHODS = {
    "saliency": (Saliency, {}),
    "guided_backprop": (GuidedBackprop, {}),
    "noise_tunnel_guided_backprop": (
        lambda model: NoiseTunnel(GuidedBackprop(model)), {"nt_samples": 3, "stdevs": 0.05}
    ),
    "integrated_gradients": (IntegratedGradients, {"n_steps": 8}),
    "contrast_saliency": (ContrastSaliency, {}),
}


def expected_scores(model, images, masks, baseline, target):
    """Target logits of the inputs hidden by hand with the union of the masks."""
    hidden = masks.cumsum(dim=1) > 0  # (N, K, 1, H, W)
    scores = [model(images)[:, target]]
    for k in range(masks.shape[1]):
        scores.append(model(torch.where(hidden[:, k], baseline, images))[:, target])
    return torch.stack(scores, dim=1)


@pytest.mark.parametrize("method_name", list(METHODS))
def test_invariants_with_captum_methods(device, method_name):
    model = max_pooling_cnn().to(device)
    make_method, attribute_kwargs = METHODS[method_name]
    method = make_method(model)
    method_state = dict(vars(method))
    images = blob_images(3, device)
    images_before = images.clone()
    state = ModelState(model, images)
    n_iter = 4

    torch.manual_seed(0)
    result = IterativeUnveiling(method).unveil(
        images, target=1, n_iter=n_iter, kernel_size=3, **attribute_kwargs
    )

    assert isinstance(result, UnveilingResult)
    assert result.masks.shape == (3, n_iter, 1, SIDE, SIDE) and result.masks.dtype == torch.bool
    assert result.attributions.shape == (3, n_iter, 1, SIDE, SIDE)
    assert result.scores.shape == (3, n_iter + 1) and result.order.shape == (3, 1, SIDE, SIDE)
    assert result.masks.device.type == torch.device(device).type
    assert result.masks.sum(dim=1).max() <= 1, "regions overlap"
    for k in range(n_iter):
        found_before = result.masks[:, :k].any(dim=1)
        # hidden pixels are never selected again and their attribution is zeroed
        assert not (result.masks[:, k] & found_before).any()
        assert (result.attributions[:, k].abs() * found_before).sum() == 0
        assert torch.equal(result.order == k + 1, result.masks[:, k])
    found = result.masks.flatten(start_dim=2).any(dim=2)
    assert torch.equal(result.n_found, found.sum(dim=1))
    assert found[:, 0].all()
    with torch.no_grad():
        reference = expected_scores(model, images, result.masks, 0.0, target=1)
    torch.testing.assert_close(result.scores, reference)
    assert torch.equal(images, images_before)
    state.assert_unchanged()
    assert vars(method) == method_state


def test_finds_weaker_blob_after_stronger(device):
    """A single fixed map with two peaks: the stronger first, then the weaker."""
    model = max_pooling_cnn().to(device)
    attribution_map = torch.zeros(2, 1, SIDE, SIDE, device=device)
    attribution_map[:, 0, 2, 2] = 1.0
    attribution_map[:, 0, 9, 9] = 0.4  # below threshold 0.5 while the first is there
    stub = FixedMap(model, attribution_map)
    result = IterativeUnveiling(stub).unveil(
        blob_images(2, device), target=1, n_iter=4, kernel_size=1, n_passes=0
    )
    assert result.order[:, 0, 2, 2].tolist() == [1, 1]
    assert result.order[:, 0, 9, 9].tolist() == [2, 2]
    assert result.n_found.tolist() == [2, 2]
    assert int((result.order > 0).sum()) == 4
    assert stub.calls == 4  # every iteration runs: no host-side check for stopped samples


def test_scores_reuse_the_forward_of_saliency(device):
    """Saliency runs the model on the unveiled input itself, so only the first and
    the last score need a forward pass of their own."""
    model = max_pooling_cnn().to(device)
    calls = []
    model.register_forward_hook(lambda module, args, outputs: calls.append(1))
    images = blob_images(2, device)
    result = IterativeUnveiling(Saliency(model)).unveil(images, target=1, n_iter=2, kernel_size=3)
    assert len(calls) == 2 + 2
    reference = expected_scores(model, images, result.masks, 0.0, target=1)
    torch.testing.assert_close(result.scores, reference)


def test_per_sample_stop_and_score_padding(device):
    model = max_pooling_cnn().to(device)
    attribution_map = torch.zeros(2, 1, SIDE, SIDE, device=device)
    attribution_map[1, 0, 5, 5] = 1.0  # sample 0 has nothing to find
    result = IterativeUnveiling(FixedMap(model, attribution_map)).unveil(
        blob_images(2, device), target=0, n_iter=5, kernel_size=1, n_passes=0
    )
    assert result.n_found.tolist() == [0, 1]
    assert not result.masks[0].any() and not result.attributions[:, 1:].any()
    assert torch.equal(result.scores[0], result.scores[0, :1].expand(6))
    assert torch.equal(result.scores[1, 2:], result.scores[1, 1:2].expand(4))


@pytest.mark.parametrize("fill_kind", ["scalar", "batch_tensor", "single_tensor", "mean", "blur"])
def test_fill_replaces_hidden_pixels(device, fill_kind):
    model = max_pooling_cnn().to(device, torch.float64)
    images = blob_images(2, device, torch.float64) + 0.3
    reference_fill = {
        "scalar": torch.tensor(-0.2, dtype=torch.float64),
        "batch_tensor": torch.linspace(-1, 1, 2 * SIDE * SIDE, dtype=torch.float64).view(images.shape),
        "single_tensor": torch.linspace(0, 1, SIDE * SIDE, dtype=torch.float64).view(1, 1, SIDE, SIDE),
        "mean": images.cpu().mean(dim=(2, 3), keepdim=True),
        "blur": blurred_by_scipy(images.cpu(), kernel_size=5),
    }[fill_kind].to(device)
    fill = {"scalar": -0.2, "mean": "mean", "blur": "blur"}.get(fill_kind, reference_fill)
    result = IterativeUnveiling(Saliency(model)).unveil(
        images, target=1, n_iter=2, kernel_size=5, fill=fill
    )
    with torch.no_grad():
        reference = expected_scores(model, images, result.masks, reference_fill, target=1)
    torch.testing.assert_close(result.scores, reference, rtol=1e-12, atol=1e-12)


def blurred_by_scipy(images, kernel_size):
    """Three box means, divided by the same of an image of ones (edge correction)."""
    box = (1, 1, kernel_size, kernel_size)
    blurred, coverage = images.numpy(), np.ones(images.shape)
    for _ in range(3):
        blurred = scipy.ndimage.uniform_filter(blurred, size=box, mode="constant")
        coverage = scipy.ndimage.uniform_filter(coverage, size=box, mode="constant")
    return torch.from_numpy(blurred / coverage)


def test_attribute_is_earliness_shaped_like_inputs(device):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).to(device)
    images = torch.randn(2, 3, SIDE, SIDE, device=device)
    unveiling = IterativeUnveiling(Saliency(model))
    result = unveiling.unveil(images, target=1, n_iter=3, kernel_size=3)
    earliness = unveiling.attribute(images, target=1, n_iter=3, kernel_size=3)
    assert earliness.shape == images.shape and earliness.dtype == images.dtype
    expected = torch.where(result.order > 0, (4 - result.order) / 3, 0).expand_as(images)
    torch.testing.assert_close(earliness, expected.to(images.dtype))
    as_tuple = unveiling.attribute((images,), target=1, n_iter=3, kernel_size=3)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], earliness)

    def perturb(inputs):
        noise = 0.01 * torch.randn_like(inputs)
        return noise, inputs - noise

    assert infidelity(model, perturb, images, earliness, target=1).shape == (2,)
    figure, _ = viz.visualize_image_attr(
        earliness[0].permute(1, 2, 0).cpu().numpy(), images[0].permute(1, 2, 0).cpu().numpy(),
        method="blended_heat_map", sign="positive", use_pyplot=False,
    )
    assert figure is not None


def test_additional_forward_args_reach_model_and_scores():
    model = max_pooling_cnn()

    def forward(inputs, scale):
        return scale * model(inputs)

    images = blob_images(2, "cpu")
    result = IterativeUnveiling(Saliency(forward)).unveil(
        images, target=1, n_iter=2, kernel_size=3, additional_forward_args=(3.0,)
    )
    with torch.no_grad():
        reference = 3.0 * expected_scores(model, images, result.masks, 0.0, target=1)
    torch.testing.assert_close(result.scores, reference)


@pytest.mark.parametrize("target_type", [list, torch.tensor])
@pytest.mark.parametrize("examples_batch_size", [1, 2, 4])
def test_examples_batch_size_gives_the_same_result(device, examples_batch_size, target_type):
    """Per-example target, fill, forward args and method kwargs (IG's baselines) are
    split with the inputs; the chunked result equals the one of the whole batch."""
    model = max_pooling_cnn().to(device)

    def forward(inputs, scale):
        return scale * model(inputs)

    images = blob_images(5, device)
    rows = torch.arange(5, device=device, dtype=images.dtype).view(5, 1, 1, 1)
    options = {
        "target": target_type([1, 0, 1, 1, 0]),
        "fill": 0.02 * rows.expand_as(images),
        "baselines": -0.01 * rows.expand_as(images),
        "additional_forward_args": (1 + rows.view(5, 1) / 4,),
        "n_iter": 3,
        "kernel_size": 3,
        "n_steps": 4,
        "internal_batch_size": 5,  # IntegratedGradients' own, passed through
        "method": "riemann_left",
    }
    unveiling = IterativeUnveiling(IntegratedGradients(forward))
    whole = unveiling.unveil(images, **options)
    chunked = unveiling.unveil(images, **options, examples_batch_size=examples_batch_size)
    for field, expected, actual in zip(UnveilingResult._fields, whole, chunked):
        torch.testing.assert_close(actual, expected, msg=field)


@pytest.mark.parametrize("examples_batch_size", [1, 2])
def test_per_example_lists_in_method_keywords_are_split(examples_batch_size):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))
    images = blob_images(3, "cpu")
    options = dict(target=[1, 2, 0], contrast_target=[0, 0, 2], n_iter=2, kernel_size=3)
    unveiling = IterativeUnveiling(ContrastSaliency(model))
    whole = unveiling.unveil(images, **options)
    chunked = unveiling.unveil(images, examples_batch_size=examples_batch_size, **options)
    for field, expected, actual in zip(UnveilingResult._fields, whole, chunked):
        torch.testing.assert_close(actual, expected, msg=field)


def test_show_progress_prints_a_bar(capsys):
    model = max_pooling_cnn()
    IterativeUnveiling(Saliency(model)).unveil(
        blob_images(1, "cpu"), target=1, n_iter=2, kernel_size=3, show_progress=True
    )
    assert "Unveiling" in capsys.readouterr().err


class FailingForward(nn.Module):
    """Wraps a model and raises on its n-th forward."""

    def __init__(self, model, fail_at):
        super().__init__()
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def forward(self, inputs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("forward failed")
        return self.model(inputs)


def test_state_restored_after_an_error():
    failing = FailingForward(max_pooling_cnn(), fail_at=4)
    failing.model[0].weight.requires_grad_(False)
    images = blob_images(2, "cpu").requires_grad_()
    state = ModelState(failing, images)
    with pytest.raises(RuntimeError, match="forward failed"):
        IterativeUnveiling(GuidedBackprop(failing)).unveil(images, target=1, n_iter=4, kernel_size=3)
    state.assert_unchanged()


def test_nan_attributions_raise():
    model = max_pooling_cnn()
    attribution_map = torch.full((1, 1, SIDE, SIDE), math.nan)
    with pytest.raises(ValueError, match="NaN or infinite"):
        IterativeUnveiling(FixedMap(model, attribution_map)).unveil(blob_images(1, "cpu"), target=1)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"inputs": (torch.ones(1, 1, SIDE, SIDE),) * 2}, ValueError, "tuple of 2.*additional_forward_args"),
        ({"inputs": torch.ones(1, 1, SIDE, SIDE, dtype=torch.long)}, TypeError, "floating-point dtype"),
        ({"inputs": torch.ones(SIDE, SIDE)}, ValueError, r"\(N, C, \*spatial\).*got shape \(12, 12\)"),
        ({"inputs": [1.0]}, TypeError, "inputs must be a Tensor, got list"),
        ({"n_iter": 0}, ValueError, "n_iter must be >= 1, got 0"),
        ({"n_iter": 2.0}, TypeError, "n_iter must be an int"),
        ({"fill": "median"}, ValueError, 'fill as a string must be "mean" or "blur"'),
        ({"fill": True}, TypeError, "fill must be a number, a Tensor"),
        ({"fill": torch.zeros(1, 1, SIDE)}, ValueError, r"fill must be shaped like inputs"),
        ({"fill": torch.zeros(1, 1, SIDE, SIDE, dtype=torch.float64)}, ValueError, "dtype and device"),
        ({"threshold": 2.0}, ValueError, r"threshold must be in \(0, 1\]"),
        ({"kernel_size": 2}, ValueError, "kernel_size must be a positive odd int"),
        ({"target": None}, ValueError, "target must select one model output per example"),
        ({"examples_batch_size": 0}, ValueError, "examples_batch_size must be None or an int >= 1, got 0"),
        ({"target": 2}, ValueError, r"target 2 is out of range for the model output of shape \(1, 2\)"),
        ({"target": torch.tensor([3])}, ValueError, r"target holds indices outside \[-2, 2\)"),
        ({"examples_batch_size": 2.0}, ValueError, "examples_batch_size must be None or an int >= 1, got 2.0"),
    ],
)
def test_argument_errors(kwargs, error, message):
    model = max_pooling_cnn()
    arguments = {"inputs": blob_images(1, "cpu"), "target": 1, **kwargs}
    with pytest.raises(error, match=message):
        IterativeUnveiling(Saliency(model)).unveil(**arguments)


def test_wrapped_method_errors():
    model = max_pooling_cnn()
    with pytest.raises(TypeError, match="attribution_method must be a Captum Attribution, got Sequential"):
        IterativeUnveiling(model)
    no_spatial_dims = FixedMap(model, torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"FixedMap.attribute must return one Tensor \(N, C', \*spatial\) with the 1 examples and the 2 spatial"):
        IterativeUnveiling(no_spatial_dims).unveil(blob_images(1, "cpu"), target=1)
    with pytest.raises(ValueError, match="return_convergence_delta=True is not supported: unveiling refines the map of IntegratedGradients"):
        IterativeUnveiling(IntegratedGradients(model)).unveil(
            blob_images(1, "cpu"), target=1, return_convergence_delta=True
        )
    with pytest.raises(ValueError, match="examples_batch_size would change the results of FeaturePermutation: FeaturePermutation permutes"):
        IterativeUnveiling(FeaturePermutation(model)).unveil(
            blob_images(2, "cpu"), target=1, examples_batch_size=1
        )


def unveil_by_hand(model, attribute, images, target, n_iter, kernel_size, fill=0.0):
    """The unveiling loop written out: the independent reference."""
    hidden = torch.zeros_like(images[:, :1], dtype=torch.bool)
    masks, current = [], images
    for _ in range(n_iter):
        attribution = attribute(current).masked_fill(hidden, 0)
        new_region = refine_mask(attribution, kernel_size=kernel_size) & ~hidden
        hidden = hidden | new_region
        current = torch.where(hidden, fill, images)
        masks.append(new_region)
    return torch.stack(masks, dim=1)


@pytest.mark.parametrize("channels", [1, 3])
def test_layer_maps_are_upsampled(device, channels):
    """A (N, 1, 4, 4) map on (N, C, 12, 12) images: bilinear upsampling by hand."""
    model = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).to(device)
    images = blob_images(2, device).expand(2, channels, SIDE, SIDE).contiguous()
    coarse = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)).to(device)
    result = IterativeUnveiling(FixedMap(model, coarse)).unveil(images, target=1, n_iter=2, kernel_size=3)
    upsampled = nn.functional.interpolate(coarse, size=(SIDE, SIDE), mode="bilinear")
    expected = unveil_by_hand(model, lambda x: upsampled, images, 1, n_iter=2, kernel_size=3)
    assert torch.equal(result.masks, expected) and result.masks.any()
    assert result.attributions.shape == (2, 2, 1, SIDE, SIDE)


def test_layer_grad_cam(device):
    model = max_pooling_cnn().to(device)
    images = blob_images(2, device)
    gradcam = LayerGradCam(model, model[0])
    result = IterativeUnveiling(gradcam).unveil(images, target=1, n_iter=2, kernel_size=3)

    def upsampled_gradcam(x):
        return LayerAttribution.interpolate(gradcam.attribute(x, target=1), (SIDE, SIDE), "bilinear")

    expected = unveil_by_hand(model, upsampled_gradcam, images, 1, n_iter=2, kernel_size=3)
    assert torch.equal(result.masks, expected)


def test_baselines_reach_the_wrapped_method():
    """Integrated gradients from the input itself is zero: nothing to find. (Before
    ``fill`` existed, ``baselines`` filled hidden pixels and IG ran from zeros.)"""
    model = max_pooling_cnn()
    images = blob_images(2, "cpu")
    unveiling = IterativeUnveiling(IntegratedGradients(model))
    from_zeros = unveiling.unveil(images, target=1, n_iter=2, kernel_size=3, n_steps=8)
    from_itself = unveiling.unveil(images, target=1, n_iter=2, kernel_size=3, n_steps=8, baselines=images)
    assert from_zeros.n_found.min() > 0 and from_itself.n_found.max() == 0


def batchnorm_dropout_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )


@pytest.mark.parametrize("as_callable", [False, True], ids=["module", "lambda"])
def test_train_mode_model_runs_in_eval_mode(device, as_callable):
    """Straight out of training: no BatchNorm update, no random dropout, modes back."""
    model = batchnorm_dropout_cnn().to(device)
    model[1].running_mean.fill_(0.1)
    images = blob_images(2, device)
    eval_copy = batchnorm_dropout_cnn().to(device)
    eval_copy.load_state_dict(model.state_dict())
    expected = IterativeUnveiling(Saliency(eval_copy.eval())).unveil(images, target=1, n_iter=3, kernel_size=3)
    model.train()
    model[3].eval()  # a mixed state must come back as it was
    state = ModelState(model, images)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    forward = (lambda x: model(x)) if as_callable else model
    result = IterativeUnveiling(Saliency(forward)).unveil(images, target=1, n_iter=3, kernel_size=3)
    state.assert_unchanged()
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert model.training and not model[3].training
    for field, actual, wanted in zip(UnveilingResult._fields, result, expected):
        torch.testing.assert_close(actual, wanted, msg=field)


def test_modes_restored_after_an_error():
    failing = FailingForward(batchnorm_dropout_cnn(), fail_at=3)
    failing.train()
    with pytest.raises(RuntimeError, match="forward failed"):
        IterativeUnveiling(Saliency(failing)).unveil(blob_images(2, "cpu"), target=1, kernel_size=3)
    assert all(module.training for module in failing.modules())


def test_multi_region_images(device):
    data = multi_region_images(6, size=48, strengths=(1.0, 0.5, 0.25), radius=2.5, seed=3, device=device)
    again = multi_region_images(6, size=48, strengths=(1.0, 0.5, 0.25), radius=2.5, seed=3)
    assert torch.equal(data.images.cpu(), again.images) and torch.equal(data.regions.cpu(), again.regions)
    assert data.images.shape == (6, 1, 48, 48) and data.regions.shape == (6, 3, 1, 48, 48)
    assert data.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert not data.regions[data.labels == 0].any()
    positive_regions = data.regions[data.labels == 1]
    assert (positive_regions.flatten(start_dim=2).sum(dim=2) > 0).all()
    assert positive_regions.sum(dim=1).max() == 1, "regions overlap"
    # the strongest region is the brightest
    peaks = [(data.images[1] * data.regions[1, r]).max().item() for r in range(3)]
    assert peaks[0] > peaks[1] > peaks[2]
    with pytest.raises(ValueError, match="radius must be > 0 and at most a sixth"):
        multi_region_images(2, size=16, radius=3.0)
    with pytest.raises(ValueError, match="n_images must be an int >= 1"):
        multi_region_images(0)


@pytest.mark.slow
def test_unveiling_finds_the_regions_single_shot_misses():
    """The issue's evidence: a max-pooling classifier leans on the strongest lesion."""
    from captum_gradmask.metrics import region_recall

    train_set = multi_region_images(1024, seed=1)
    test_set = multi_region_images(64, seed=2)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        batch = torch.randint(0, 1024, (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(train_set.images[batch]), train_set.labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    positives = test_set.labels == 1
    images, regions = test_set.images[positives], test_set.regions[positives]
    single = refine_mask(Saliency(model).attribute(images, target=1), kernel_size=5)
    result = IterativeUnveiling(Saliency(model)).unveil(images, target=1, n_iter=5, kernel_size=5)
    assert (region_recall(single[:, None], regions) * 3).nanmean() <= 1.0 + 1e-6
    assert (region_recall(result.masks, regions)[:, -1] * 3).nanmean() >= 2.5


def test_neuron_methods_explain_the_neuron_and_score_the_target():
    model = max_pooling_cnn()
    images = blob_images(2, "cpu")
    neuron = NeuronGradient(model, model[0])
    result = IterativeUnveiling(neuron).unveil(
        images, target=1, n_iter=2, kernel_size=3, neuron_selector=(1, 3, 3)
    )
    expected = unveil_by_hand(
        model, lambda x: neuron.attribute(x, neuron_selector=(1, 3, 3)), images, 1, n_iter=2, kernel_size=3
    )
    assert torch.equal(result.masks, expected) and expected.any()
    with torch.no_grad():
        reference = expected_scores(model, images, result.masks, 0.0, target=1)
    torch.testing.assert_close(result.scores, reference)


class PoolingCNN(nn.Module):
    """Layers every Captum method has rules for (LRP has none for nn.Flatten)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(4 * (SIDE // 2) ** 2, 2)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


MORE_METHODS = {
    "input_x_gradient": (InputXGradient, {}),
    "deconvolution": (Deconvolution, {}),
    "lrp": (LRP, {}),
    "deeplift": (DeepLift, {"baselines": 0.1}),
    "deeplift_shap": (DeepLiftShap, {"baselines": "distribution"}),
    "gradient_shap": (GradientShap, {"baselines": "distribution", "n_samples": 3}),
    "noise_tunnel_integrated_gradients": (
        lambda model: NoiseTunnel(IntegratedGradients(model)), {"nt_samples": 2, "stdevs": 0.1, "n_steps": 4}
    ),
}


@pytest.mark.filterwarnings("ignore:Setting")
@pytest.mark.parametrize("name", list(MORE_METHODS))
def test_more_captum_methods_match_the_loop_by_hand(name):
    model = PoolingCNN().eval()
    images = blob_images(2, "cpu", torch.float64)
    model.double()
    make, kwargs = MORE_METHODS[name]
    if kwargs.get("baselines") == "distribution":
        kwargs = {**kwargs, "baselines": 0.1 * torch.randn(3, 1, SIDE, SIDE, dtype=torch.float64)}
    method = make(model)
    torch.manual_seed(0)
    np.random.seed(0)
    result = IterativeUnveiling(method).unveil(images, target=1, n_iter=2, kernel_size=3, **kwargs)
    torch.manual_seed(0)
    np.random.seed(0)
    expected = unveil_by_hand(
        model, lambda x: method.attribute(x, target=1, **kwargs).detach(), images, 1, n_iter=2, kernel_size=3
    )
    assert torch.equal(result.masks, expected) and expected.any()
