import math

import pytest
import torch
import torch.nn.functional as F
from captum.attr import (
    FeatureAblation,
    IntegratedGradients,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from captum_gradmask.contrast_saliency import ContrastSaliency
from captum_gradmask.datasets.vessels import synthetic_vessels
from captum_gradmask import MCAttribution, MCDropout, Uncertainty, predictive_uncertainty
from helpers import ModelState


def dropout_cnn(n_classes=3, batchnorm=False):
    """A smooth CNN with channel-wise and element-wise dropout."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4) if batchnorm else nn.Identity(),
        nn.Tanh(),
        nn.Dropout2d(0.3),
        nn.Flatten(),
        nn.Dropout(0.4),
        nn.Linear(4 * 6 * 6, n_classes),
    )


def dropout_segmenter(n_classes=3):
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Dropout2d(0.5), nn.Conv2d(4, n_classes, 1)
    )


def make(device, dtype=torch.float64, n_samples=6, seed=0, **model_kwargs):
    torch.manual_seed(0)
    model = dropout_cnn(**model_kwargs).to(device, dtype)
    x = torch.randn(5, 1, 6, 6, device=device, dtype=dtype)
    return model, MCDropout(model, n_samples=n_samples, seed=seed), x


# --- the sub-networks -----------------------------------------------------------------


def test_element_wise_masks_are_shared_across_the_batch(device):
    p = 0.3
    mc_model = MCDropout(nn.Sequential(nn.Dropout(p)), n_samples=5)
    masks = mc_model(torch.ones(3, 2000, device=device))
    assert masks.shape == (5, 3, 2000)
    kept = masks[masks != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))
    assert torch.equal(masks[:, 0], masks[:, 1]) and torch.equal(masks[:, 0], masks[:, 2])
    assert not torch.equal(masks[0], masks[1])
    keep_fraction = (masks > 0).double().mean(dim=(1, 2))
    assert ((keep_fraction - (1 - p)).abs() < 0.05).all()


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Dropout1d(0.5), (2, 40, 7)),
        (nn.Dropout2d(0.5), (2, 40, 3, 4)),
        (nn.Dropout3d(0.5), (2, 40, 2, 3, 2)),
    ],
)
def test_channel_wise_masks(device, layer, shape):
    masks = MCDropout(nn.Sequential(layer), n_samples=4)(torch.ones(shape, device=device))
    per_channel = masks.flatten(3)
    assert torch.equal(per_channel, per_channel[..., :1].expand_as(per_channel))
    assert torch.equal(masks[:, 0], masks[:, 1])
    assert set(masks.unique().tolist()) <= {0.0, 2.0}


def test_batched_equals_loop_over_samples(device):
    _, mc_model, x = make(device, dtype=torch.float32, n_samples=7)
    batched = mc_model(x)
    looped = mc_model(x, mc_samples_batch_size=1)
    uneven_chunks = mc_model(x, mc_samples_batch_size=3)
    assert batched.shape == (7, 5, 3)
    torch.testing.assert_close(batched, looped, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batched, uneven_chunks, rtol=1e-6, atol=1e-6)
    assert batched.std(0).min() > 0


def test_batch_invariance(device):
    _, mc_model, x = make(device)
    together = mc_model(x)
    apart = torch.cat([mc_model(x[:1]), mc_model(x[1:])], dim=1)
    torch.testing.assert_close(together, apart, rtol=1e-12, atol=1e-12)


def test_reproducible_and_independent_of_global_rng(device):
    model, mc_model, x = make(device)
    torch.manual_seed(123)
    first = mc_model(x)
    torch.manual_seed(456)
    assert torch.equal(MCDropout(model, n_samples=6, seed=0)(x), first)
    assert not torch.equal(MCDropout(model, n_samples=6, seed=1)(x), first)


def test_global_rng_state_unchanged(device):
    _, mc_model, x = make(device)
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None
    mc_model(x)
    mc_model.uncertainty(x)
    MCAttribution(IntegratedGradients, mc_model).attribute(x, target=0, n_steps=5)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    if cuda_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(device), cuda_state)


def test_batchnorm_statistics_and_modes_unchanged(device):
    model, mc_model, x = make(device, batchnorm=True)
    model.train()
    x.requires_grad_()
    batchnorm = model[1]
    statistics = [
        t.clone()
        for t in (batchnorm.running_mean, batchnorm.running_var, batchnorm.num_batches_tracked)
    ]
    state = ModelState(model, x)
    mc_model(x)
    mc_model.uncertainty(x)
    MCAttribution(Saliency, mc_model).attribute(x, target=1)
    after = (batchnorm.running_mean, batchnorm.running_var, batchnorm.num_batches_tracked)
    assert all(torch.equal(a, b) for a, b in zip(after, statistics))
    state.assert_unchanged()
    # Running statistics are used, not batch statistics: one example gives the same rows.
    torch.testing.assert_close(mc_model(x[:1]), mc_model(x)[:, :1], rtol=1e-12, atol=1e-12)


def assert_clean_after_error(model, mc_model, state, rng_state):
    state.assert_unchanged()
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert mc_model._pass is None
    assert all("forward" not in layer.module.__dict__ for layer in mc_model.stochastic_layers)


def test_modes_and_hooks_restored_after_exception(device):
    model, mc_model, x = make(device)
    model.train()
    model[0].register_forward_hook(lambda *args: None)
    state, rng_state = ModelState(model, x), torch.get_rng_state()
    with pytest.raises(RuntimeError):
        mc_model(torch.zeros(5, 1, 7, 7, device=device, dtype=x.dtype))  # wrong size for Linear
    assert_clean_after_error(model, mc_model, state, rng_state)
    with pytest.raises(ValueError, match="target 7 is out of range"):
        MCAttribution(Saliency, mc_model).attribute(x, target=7)  # no output 7
    assert_clean_after_error(model, mc_model, state, rng_state)
    # and the dropout layers work normally again
    model.eval()
    torch.testing.assert_close(model(x), model(x))


# --- refusals and argument checks ----------------------------------------------------


class RandomInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.5)
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(F.dropout(self.dropout(x), 0.5, training=True))


class MyDropout(nn.Dropout):
    pass


@pytest.mark.parametrize(
    "model, message",
    [
        (nn.Sequential(nn.Linear(4, 2)), "has no nn.Dropout"),
        (nn.Sequential(nn.Dropout(0.0), nn.Linear(4, 2)), "with p > 0"),
        (nn.Sequential(nn.Dropout(0.5), nn.AlphaDropout(0.1)), "AlphaDropout"),
        (nn.Sequential(nn.Dropout(0.5), nn.FeatureAlphaDropout(0.1)), "FeatureAlphaDropout"),
        (nn.Sequential(MyDropout(0.5)), "subclasses"),
        (
            nn.Sequential(nn.Dropout(0.5), nn.MultiheadAttention(4, 2, dropout=0.1)),
            "MultiheadAttention",
        ),
    ],
)
def test_refuses_models_it_cannot_control(model, message):
    with pytest.raises(ValueError, match=message):
        MCDropout(model)


def test_accepts_attention_without_dropout():
    MCDropout(nn.Sequential(nn.Dropout(0.5), nn.MultiheadAttention(4, 2, dropout=0.0)))


def test_refuses_global_random_draws_and_restores_rng():
    mc_model = MCDropout(RandomInForward(), n_samples=3)
    rng_state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="global random generator"):
        mc_model(torch.randn(2, 4, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.get_rng_state(), rng_state)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"model": lambda x: x}, TypeError, "model must be an nn.Module"),
        ({"n_samples": 0}, ValueError, "n_samples must be an int >= 1, got 0"),
        ({"n_samples": 2.0}, ValueError, "n_samples"),
        ({"seed": "0"}, TypeError, "seed must be an int, got str"),
    ],
)
def test_constructor_checks(kwargs, error, message):
    arguments = {"model": nn.Sequential(nn.Dropout(0.5))}
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        MCDropout(**arguments)


class BatchLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(x.t()).t()


class TupleOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(x), x


def test_call_checks():
    mc_model = MCDropout(nn.Sequential(nn.Dropout(0.5)), n_samples=2)
    with pytest.raises(TypeError, match="floating-point dtype"):
        mc_model(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(
        ValueError, match="mc_samples_batch_size must be None or an int >= 1, got 0"
    ):
        mc_model(torch.ones(2, 3), mc_samples_batch_size=0)
    with pytest.raises(ValueError, match="activation must be 'softmax' or 'sigmoid'"):
        mc_model.uncertainty(torch.ones(2, 3), activation="relu")
    with pytest.raises(ValueError, match="C >= 2 classes"):
        mc_model.uncertainty(torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"needs batched 4-D inputs"):
        MCDropout(nn.Sequential(nn.Dropout2d(0.5)))(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="needs the batch first in every stochastic layer"):
        MCDropout(BatchLast())(torch.ones(2, 3))
    with pytest.raises(ValueError, match="must return a Tensor with the batch"):
        MCDropout(TupleOutput())(torch.ones(2, 3))


def test_predictive_uncertainty_checks():
    with pytest.raises(TypeError, match="probs must be a Tensor, got list"):
        predictive_uncertainty([[[1.0]]])
    with pytest.raises(TypeError, match="floating-point"):
        predictive_uncertainty(torch.ones(2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(T, N, C, ...\).*\(4, 3\)"):
        predictive_uncertainty(torch.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="Pass probabilities, not logits"):
        predictive_uncertainty(torch.randn(4, 2, 3))
    with pytest.raises(ValueError, match="non-negative"):
        predictive_uncertainty(torch.tensor([[[1.5, -0.5]]]))


def test_attribution_checks():
    model, mc_model, x = make("cpu")
    with pytest.raises(TypeError, match="mc_model must be an MCDropout, got Sequential"):
        MCAttribution(Saliency, model)
    with pytest.raises(TypeError, match="must return a Captum Attribution, got object"):
        MCAttribution(lambda forward: object(), mc_model)
    attribution = MCAttribution(IntegratedGradients, mc_model)
    with pytest.raises(ValueError, match="target has 2 entries but inputs have 5"):
        attribution.attribute(x, target=[0, 1])
    with pytest.raises(ValueError, match=r"shape \(5,\).*got shape \(2, 5\)"):
        attribution.attribute(x, target=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="mc_samples_batch_size"):
        attribution.attribute(x, target=0, mc_samples_batch_size=-1)


# --- uncertainty ---------------------------------------------------------------------


def reference_uncertainty(probs):
    """Float64 formulas written out over (T, N, C): the independent reference."""
    probs = probs.double()
    n_samples, n_classes = probs.shape[0], probs.shape[2]

    def entropy(p):
        return -sum(torch.special.xlogy(p[:, c], p[:, c]) for c in range(n_classes))

    mean = probs.mean(0)
    predictive = entropy(mean)
    expected = sum(entropy(probs[t]) for t in range(n_samples)) / n_samples
    votes = torch.stack([(probs.argmax(2) == c).sum(0) for c in range(n_classes)])
    return (
        mean,
        predictive,
        expected,
        predictive - expected,
        1 - votes.max(0).values.double() / n_samples,
    )


def assert_matches_reference(result, reference, tolerance):
    for field, value, expected in zip(Uncertainty._fields, result, reference):
        torch.testing.assert_close(
            value.double(), expected.double(), rtol=tolerance, atol=tolerance, msg=field
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uncertainty_of_classifier_matches_reference(device, dtype):
    _, mc_model, x = make(device, dtype=dtype, n_samples=9)
    result = mc_model.uncertainty(x)
    reference = reference_uncertainty(torch.softmax(mc_model(x).double(), dim=2))
    assert result.mean.dtype == dtype and result.mean.device == x.device
    assert_matches_reference(result, reference, 1e-12 if dtype == torch.float64 else 1e-5)
    assert result.mutual_information.max() > 0


def test_uncertainty_is_per_pixel_for_segmentation(device):
    torch.manual_seed(0)
    mc_model = MCDropout(dropout_segmenter().to(device).double(), n_samples=8)
    x = torch.randn(2, 1, 5, 7, device=device, dtype=torch.float64)
    result = mc_model.uncertainty(x, mc_samples_batch_size=3)
    assert result.mean.shape == (2, 3, 5, 7)
    assert all(value.shape == (2, 5, 7) for value in result[1:])
    probs = torch.softmax(mc_model(x), dim=2)
    reference = reference_uncertainty(probs.movedim(2, -1).reshape(8, -1, 3))
    flat = [result.mean.movedim(1, -1).reshape(-1, 3)] + [value.reshape(-1) for value in result[1:]]
    assert_matches_reference(flat, reference, 1e-12)


def test_sigmoid_uncertainty_matches_binary_reference(device):
    torch.manual_seed(0)
    mc_model = MCDropout(dropout_segmenter(n_classes=2).to(device).double(), n_samples=8)
    x = torch.randn(2, 1, 4, 4, device=device, dtype=torch.float64)
    result = mc_model.uncertainty(x, activation="sigmoid")
    assert all(value.shape == (2, 2, 4, 4) for value in result)
    positive = torch.sigmoid(mc_model(x))
    reference = list(
        reference_uncertainty(torch.stack([1 - positive, positive], dim=-1).reshape(8, -1, 2))
    )
    reference[0] = reference[0][:, 1]
    assert_matches_reference([value.reshape(-1) for value in result], reference, 1e-12)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_uncertainty_finite_for_saturated_logits(activation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.sign(torch.randn(3, 8)) * 1e4 / 4)
        model[1].bias.zero_()
    mc_model = MCDropout(model, n_samples=10)
    x = torch.randn(4, 8)
    assert mc_model(x).abs().max() > 1e3
    result = mc_model.uncertainty(x, activation=activation)
    bound = math.log(3 if activation == "softmax" else 2)
    for value in result:
        assert torch.isfinite(value).all()
    assert (result.predictive_entropy <= bound + 1e-6).all()
    assert (result.mutual_information >= 0).all()


def test_one_hot_probabilities():
    # Two sub-networks certain of class 0, two certain of class 1: all uncertainty is
    # epistemic, log 2 nats; the fifth example is certain throughout.
    one_hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    probs = torch.stack([one_hot[0], one_hot[0], one_hot[1], one_hot[1]]).unsqueeze(1)
    probs = torch.cat([probs, one_hot[0].expand(4, 1, 3)], dim=1)
    result = predictive_uncertainty(probs)
    torch.testing.assert_close(result.predictive_entropy, torch.tensor([math.log(2), 0.0]))
    torch.testing.assert_close(result.expected_entropy, torch.zeros(2))
    torch.testing.assert_close(result.mutual_information, torch.tensor([math.log(2), 0.0]))
    torch.testing.assert_close(result.variation_ratio, torch.tensor([0.5, 0.0]))


@st.composite
def stacked_probabilities(draw):
    n_samples, batch, n_classes = (
        draw(st.integers(1, 6)),
        draw(st.integers(1, 3)),
        draw(st.integers(2, 5)),
    )
    spatial = draw(st.lists(st.integers(1, 3), max_size=2))
    seed = draw(st.integers(0, 2**31))
    sharpness = draw(st.sampled_from([0.1, 1.0, 30.0]))
    generator = torch.Generator().manual_seed(seed)
    logits = sharpness * torch.randn(
        n_samples, batch, n_classes, *spatial, generator=generator, dtype=torch.float64
    )
    probs = torch.softmax(logits, dim=2)
    if draw(st.booleans()):  # exact zeros and ones
        probs = F.one_hot(probs.argmax(2), n_classes).movedim(-1, 2).double()
    return probs


@given(stacked_probabilities())
def test_uncertainty_properties(probs):
    n_samples, batch, n_classes = probs.shape[:3]
    result = predictive_uncertainty(probs)
    spatial = probs.shape[3:]
    assert result.mean.shape == (batch, n_classes, *spatial)
    assert all(value.shape == (batch, *spatial) for value in result[1:])
    for entropy in (result.predictive_entropy, result.expected_entropy):
        assert (entropy >= 0).all() and (entropy <= math.log(n_classes) + 1e-12).all()
    assert (result.mutual_information >= 0).all()
    assert (
        (result.variation_ratio >= 0) & (result.variation_ratio <= 1 - 1 / n_classes + 1e-12)
    ).all()
    reference = reference_uncertainty(probs.movedim(2, -1).reshape(n_samples, -1, n_classes))
    flat = [result.mean.movedim(1, -1).reshape(-1, n_classes)] + [
        value.reshape(-1) for value in result[1:]
    ]
    reference = list(reference)
    reference[3] = reference[3].clamp_min(0)
    assert_matches_reference(flat, reference, 1e-10)


# --- attributions --------------------------------------------------------------------


def per_sample_gradients(mc_model, x, target):
    """d f_t(x)[target] / dx for every t, by float64 autograd through the MC forward."""
    x = x.detach().requires_grad_()
    outputs = mc_model(x)[:, torch.arange(x.shape[0]), target]
    return torch.stack(
        [
            torch.autograd.grad(outputs[t].sum(), x, retain_graph=True)[0]
            for t in range(outputs.shape[0])
        ]
    )


def test_saliency_mean_and_std_equal_loop_over_sub_networks(device):
    _, mc_model, x = make(device, n_samples=5)
    target = [0, 1, 2, 0, 1]
    reference = per_sample_gradients(mc_model, x, target).abs()
    mean, std = MCAttribution(Saliency, mc_model).attribute(x, target=target, return_std=True)
    torch.testing.assert_close(mean, reference.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std, reference.std(0, correction=0), rtol=1e-10, atol=1e-12)
    chunked = MCAttribution(Saliency, mc_model).attribute(
        x, target=torch.tensor(target, device=device), mc_samples_batch_size=2
    )
    torch.testing.assert_close(chunked, mean, rtol=1e-12, atol=1e-12)
    assert std.max() > 0


def test_integrated_gradients_completeness(device):
    _, mc_model, x = make(device, n_samples=8)
    baselines = 0.1 * torch.randn_like(x)
    attributions = MCAttribution(IntegratedGradients, mc_model).attribute(
        x, target=1, baselines=baselines, n_steps=300
    )
    expected = (mc_model(x)[..., 1] - mc_model(baselines)[..., 1]).mean(0)
    torch.testing.assert_close(attributions.sum(dim=(1, 2, 3)), expected, rtol=1e-3, atol=1e-6)


def test_attribution_batch_invariance_and_reproducibility(device):
    model, mc_model, x = make(device)
    attribution = MCAttribution(IntegratedGradients, mc_model)
    together = attribution.attribute(x, target=2, n_steps=20)
    apart = torch.cat(
        [
            attribution.attribute(x[:2], target=2, n_steps=20),
            attribution.attribute(x[2:], target=2, n_steps=20),
        ]
    )
    torch.testing.assert_close(together, apart, rtol=1e-12, atol=1e-12)
    torch.manual_seed(99)
    again = MCAttribution(IntegratedGradients, MCDropout(model, n_samples=6)).attribute(
        x, target=2, n_steps=20
    )
    assert torch.equal(again, together)


def test_contrast_saliency_and_noise_tunnel(device):
    _, mc_model, x = make(device, n_samples=4)
    d1 = per_sample_gradients(mc_model, x, 1)
    d0 = per_sample_gradients(mc_model, x, 0)
    logits = mc_model(x)
    sign = torch.sign(logits[..., 1] - logits[..., 0]).view(4, 5, 1, 1, 1)
    reference = (sign * (d1 - d0)).abs().mean(0)
    contrast = MCAttribution(ContrastSaliency, mc_model).attribute(x, target=1, contrast_target=0)
    torch.testing.assert_close(contrast, reference, rtol=1e-10, atol=1e-12)
    # Without noise, SmoothGrad is the MC saliency itself.
    smooth = MCAttribution(lambda forward: NoiseTunnel(Saliency(forward)), mc_model)
    no_noise = smooth.attribute(x, target=1, nt_type="smoothgrad", nt_samples=3, stdevs=0.0)
    torch.testing.assert_close(no_noise, d1.abs().mean(0), rtol=1e-10, atol=1e-12)
    noisy = smooth.attribute(x, target=1, nt_samples=3, stdevs=0.5)
    assert noisy.shape == x.shape and torch.isfinite(noisy).all()


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.5)
        self.linear = nn.Linear(6, 2)

    def forward(self, a, b, scale):
        return self.linear(self.dropout(torch.cat([a, b], dim=1))) * scale


def test_tuple_inputs_additional_args_and_other_methods(device):
    torch.manual_seed(0)
    mc_model = MCDropout(TwoInputs().to(device).double(), n_samples=5)
    a = torch.randn(3, 4, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, device=device, dtype=torch.float64)
    scale = torch.tensor([[1.0], [2.0], [3.0]], device=device, dtype=torch.float64)
    state = ModelState(mc_model.model, a, b)
    grads = MCAttribution(Saliency, mc_model).attribute(
        (a, b), target=1, additional_forward_args=scale, abs=False
    )
    assert isinstance(grads, tuple) and grads[0].shape == a.shape and grads[1].shape == b.shape
    # The output is linear after the dropout: the gradient of sub-network t is
    # scale * mask_t * w. A lone dropout layer with the same seed, p and feature shape
    # has the same masks.
    masks = MCDropout(nn.Sequential(nn.Dropout(0.5)), n_samples=5)(
        torch.ones(1, 6, device=device, dtype=torch.float64)
    )
    reference = (masks.squeeze(1) * mc_model.model.linear.weight[1]).mean(0) * scale
    torch.testing.assert_close(torch.cat(grads, dim=1), reference, rtol=1e-12, atol=1e-12)
    ablation = MCAttribution(FeatureAblation, mc_model).attribute(
        (a, b), target=1, additional_forward_args=scale, mc_samples_batch_size=2
    )
    assert ablation[0].shape == a.shape
    state.assert_unchanged()


def test_layer_attribution(device):
    model, mc_model, x = make(device, n_samples=3)
    gradcam = MCAttribution(LayerGradCam, mc_model, layer=model[0]).attribute(x, target=1)
    assert gradcam.shape == (5, 1, 6, 6)


# --- the synthetic vessel images of the example ---------------------------------------


def test_synthetic_vessels(device):
    rng_state = torch.get_rng_state()
    data = synthetic_vessels(6, size=32, seed=3, device=device, lesion_probability=0.5)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert data.images.shape == data.vessels.shape == data.lesions.shape == (6, 1, 32, 32)
    assert data.images.dtype == torch.float32 and data.vessels.dtype == torch.bool
    assert data.images.device.type == torch.device(device).type
    assert torch.equal(data.labels, data.lesions.flatten(1).any(1).long())
    outside_view = data.images == 0
    assert not (data.vessels & outside_view).any()
    assert 0.02 < data.vessels.double().mean() < 0.3
    again = synthetic_vessels(6, size=32, seed=3, lesion_probability=0.5)
    assert torch.equal(again.images, data.images.cpu())
    assert not torch.equal(synthetic_vessels(6, size=32, seed=4).images, again.images)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_images": 0}, "n_images must be an int >= 1, got 0"),
        ({"size": 16}, "size must be an int >= 32, got 16"),
        ({"lesion_probability": 1.5}, r"lesion_probability must be in \[0, 1\], got 1.5"),
        ({"noise_std": -0.1}, "noise_std must be >= 0, got -0.1"),
    ],
)
def test_synthetic_vessels_checks(kwargs, message):
    arguments = {"n_images": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        synthetic_vessels(**arguments)


# --- stochastic depth, folded rows, checkpointing -------------------------------------


class DropPath(nn.Module):
    """Stochastic depth as MONAI and timm write it: one draw per example in training."""

    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, True

    def forward(self, x):
        if not self.training or self.drop_prob == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.drop_prob)
        return x * keep / (1 - self.drop_prob)


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth's attributes (torchvision is not a dependency)."""

    def __init__(self, p, mode="row"):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):
        return x  # eval mode


class ResidualDropPath(nn.Module):
    def __init__(self, stochastic_depth=DropPath):
        super().__init__()
        torch.manual_seed(0)
        self.branch = nn.Linear(4, 4)
        self.drop_path = stochastic_depth(0.5)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(x + self.drop_path(self.branch(x)))


@pytest.mark.parametrize("stochastic_depth", [DropPath, StochasticDepth])
def test_stochastic_depth_is_sampled_per_sub_network(device, stochastic_depth):
    model = ResidualDropPath(stochastic_depth).to(device, torch.float64)
    x = torch.randn(3, 4, device=device, dtype=torch.float64)
    mc_model = MCDropout(model, n_samples=8)
    assert [layer.mask_kind for layer in mc_model.stochastic_layers] == ["sample"]
    outputs = mc_model(x)
    with torch.no_grad():
        kept = model.head(x + 2 * model.branch(x))  # scaled by 1 / keep
        dropped = model.head(x)
    is_kept = [torch.allclose(outputs[t], kept) for t in range(8)]
    is_dropped = [torch.allclose(outputs[t], dropped) for t in range(8)]
    assert all(k != d for k, d in zip(is_kept, is_dropped)), "each sub-network keeps or drops every example"
    assert any(is_kept) and any(is_dropped)
    torch.testing.assert_close(mc_model(x, mc_samples_batch_size=3), outputs, rtol=0, atol=0)


class WindowDropout(nn.Module):
    """Folds 2 x 2 windows into the batch dimension, batch first, as window attention does."""

    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        n, c, h, w = x.shape
        windows = x.view(n, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5).reshape(n * 4, c, h // 2, w // 2)
        dropped = self.dropout(windows)
        return dropped.view(n, 2, 2, c, h // 2, w // 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def test_folded_rows_get_one_mask_per_window_shared_by_the_batch(device):
    mc_model = MCDropout(WindowDropout(), n_samples=4)
    masks = mc_model(torch.ones(2, 1, 4, 4, device=device))  # (T, N, 1, 4, 4): the masks
    assert torch.equal(masks[:, 0], masks[:, 1])
    # one mask per window: the top-left and bottom-right windows differ somewhere
    assert not all(torch.equal(masks[t, 0, 0, :2, :2], masks[t, 0, 0, 2:, 2:]) for t in range(4))
    torch.testing.assert_close(mc_model(torch.ones(2, 1, 4, 4, device=device), mc_samples_batch_size=1), masks)


class CheckpointedNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)
        self.checkpointed = True

    def forward(self, x):
        if self.checkpointed:
            return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))
        return self.head(self.block(x))


def test_activation_checkpointed_networks(device):
    model = CheckpointedNet().to(device, torch.float64)
    x = torch.randn(3, 6, device=device, dtype=torch.float64)
    mc_model = MCDropout(model, n_samples=4)
    checkpointed = MCAttribution(IntegratedGradients, mc_model).attribute(x, target=1, n_steps=5)
    model.checkpointed = False
    plain = MCAttribution(IntegratedGradients, mc_model).attribute(x, target=1, n_steps=5)
    torch.testing.assert_close(checkpointed, plain, rtol=1e-12, atol=1e-12)
    # A backward through the MC outputs themselves runs inside the sampling block.
    model.checkpointed = True
    leaf = x.clone().requires_grad_()
    with mc_model.sampling(range(4)):
        rows = leaf.repeat(4, 1)
        mc_model.run_rows((rows,), torch.arange(4, device=device).repeat_interleave(3)).sum().backward()
    expected = leaf.detach().requires_grad_()
    model.checkpointed = False
    mc_model(expected).sum().backward()
    torch.testing.assert_close(leaf.grad, expected.grad, rtol=1e-12, atol=1e-12)
    # A backward through mc_model(x) itself, chunked or not: input and parameter
    # gradients equal those of the plain network.
    for chunk in (None, 3):
        model.checkpointed = False
        plain_leaf = x.clone().requires_grad_()
        model.zero_grad()
        (mc_model(plain_leaf, mc_samples_batch_size=chunk) ** 2).sum().backward()
        plain_gradients = [p.grad.clone() for p in model.parameters()]
        model.checkpointed = True
        leaf = x.clone().requires_grad_()
        model.zero_grad()
        (mc_model(leaf, mc_samples_batch_size=chunk) ** 2).sum().backward()
        torch.testing.assert_close(leaf.grad, plain_leaf.grad, rtol=1e-12, atol=1e-12)
        for p, expected_gradient in zip(model.parameters(), plain_gradients):
            torch.testing.assert_close(p.grad, expected_gradient, rtol=1e-12, atol=1e-12)


class FlashAttentionBlock(nn.Module):
    """MONAI's SABlock attributes: SDPA with dropout even in eval mode."""

    def __init__(self):
        super().__init__()
        self.use_flash_attention, self.dropout_rate = True, 0.1
        self.dropout = nn.Dropout(0.1)


@pytest.mark.parametrize(
    "model, message",
    [
        (FlashAttentionBlock(), "Build it with use_flash_attention=False"),
    ],
)
def test_refuses_randomness_outside_layers_with_how_to_run_the_model(model, message):
    with pytest.raises(ValueError, match=message):
        MCDropout(model)


def test_layers_with_p_zero_are_left_alone():
    model = nn.Sequential(nn.Dropout(0.0), nn.Linear(4, 4), nn.Dropout(0.3))
    assert [layer.name for layer in MCDropout(model).stochastic_layers] == ["2"]


class DropConnectBlock(nn.Module):
    """MONAI's EfficientNet block: drop_connect (a function) after _bn2, then the skip."""

    def __init__(self, rate):
        super().__init__()
        torch.manual_seed(0)
        self.id_skip, self.stride, self.in_channels, self.out_channels = True, 1, 4, 4
        self.drop_connect_rate = rate
        self._project = nn.Linear(4, 4)
        self._bn2 = nn.BatchNorm1d(4).eval()

    def forward(self, x):
        return self._bn2(self._project(x)) + x  # drop_connect is off in eval mode


def test_efficientnet_drop_connect_is_sampled(device):
    block = DropConnectBlock(0.5).to(device, torch.float64)
    x = torch.randn(3, 4, device=device, dtype=torch.float64)
    outputs = MCDropout(block, n_samples=8)(x)
    with torch.no_grad():
        branch = block._bn2(block._project(x))
    kept = [torch.allclose(outputs[t], 2 * branch + x) for t in range(8)]
    dropped = [torch.allclose(outputs[t], x) for t in range(8)]
    assert all(k != d for k, d in zip(kept, dropped)) and any(kept) and any(dropped)


def test_masks_of_a_pass_serve_the_next_pass_of_the_same_samples(device, monkeypatch):
    model, mc_model, x = make(device)
    drawn = []
    draw = mc_model._draw_masks
    monkeypatch.setattr(mc_model, "_draw_masks", lambda *args: drawn.append(args[0]) or draw(*args))
    first = mc_model(x)
    n_layers = len(drawn)
    assert torch.equal(mc_model(x), first) and len(drawn) == n_layers  # all T in one pass: reused
    chunked = mc_model(x, mc_samples_batch_size=2)
    assert len(drawn) == n_layers + 3 * n_layers  # three chunks, each drawn anew
    torch.testing.assert_close(chunked, first, rtol=0, atol=0)
