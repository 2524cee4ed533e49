"""MCAttribution against each sub-network run on its own (tests/helpers.py
``per_sub_network``: masks probed from outside, applied by hooks on the plain model),
on float32 ReLU / max-pool / BatchNorm networks, 2-D and 3-D, at batch sizes 1 and 2."""

import numpy as np
import pytest
import torch
from captum.attr import (
    DeepLift,
    DeepLiftShap,
    Deconvolution,
    FeatureAblation,
    FeaturePermutation,
    GradientShap,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerActivation,
    LayerGradCam,
    NeuronGradient,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from torch import nn

from captum_gradmask import ContrastSaliency, IterativeUnveiling, MCAttribution, MCDropout
from helpers import per_sub_network

T = 3


def dropout_net(dims: int, batchnorm: bool = False, softmax: bool = False) -> nn.Module:
    """Conv -> [BatchNorm] -> ReLU -> channel dropout -> max-pool -> dropout -> linear."""
    conv, norm, dropout, pool = {
        2: (nn.Conv2d, nn.BatchNorm2d, nn.Dropout2d, nn.MaxPool2d),
        3: (nn.Conv3d, nn.BatchNorm3d, nn.Dropout3d, nn.MaxPool3d),
    }[dims]
    torch.manual_seed(0)
    layers = [
        conv(1, 4, 3, padding=1), norm(4) if batchnorm else nn.Identity(), nn.ReLU(),
        dropout(0.3), pool(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * 3**dims, 3),
    ]
    model = nn.Sequential(*layers, *([nn.Softmax(dim=1)] if softmax else []))
    if batchnorm:
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


def images(n: int, dims: int, device, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(n)
    return torch.randn(n, 1, *(6,) * dims, generator=generator).to(device, dtype)


def reference(mc_model, x, method, init=None, **kwargs):
    """Mean and std over sub-networks of the plain Captum method, and the list."""
    results = per_sub_network(
        mc_model, x, lambda: method(mc_model.model, **(init or {})).attribute(x, **kwargs)
    )
    stacked = torch.stack(results)
    return stacked.mean(0), stacked.std(0, correction=0)


def assert_close(actual, expected, dtype):
    tolerance = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)


METHODS = {
    "saliency": (Saliency, {}, {}),
    "input_x_gradient": (InputXGradient, {}, {}),
    "integrated_gradients": (IntegratedGradients, {}, {"n_steps": 6}),
    "guided_backprop": (GuidedBackprop, {}, {}),
    "deconvolution": (Deconvolution, {}, {}),
    "deeplift": (DeepLift, {}, {}),
    "layer_grad_cam": (LayerGradCam, {"layer": 0}, {}),
    "occlusion": (Occlusion, {}, {"sliding_window_shapes": "window"}),
    "feature_ablation": (FeatureAblation, {}, {}),
}
NETWORKS = [(2, False, torch.float32), (2, True, torch.float32), (3, True, torch.float32), (2, False, torch.float64)]


@pytest.mark.filterwarnings("ignore:Setting backward hooks")
@pytest.mark.parametrize("dims, batchnorm, dtype", NETWORKS, ids=["relu2d", "bn2d", "bn3d", "relu2d-f64"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("name", list(METHODS))
def test_mean_and_std_equal_each_sub_network_on_its_own(device, name, n, dims, batchnorm, dtype):
    model = dropout_net(dims, batchnorm).to(device, dtype)
    mc_model = MCDropout(model, n_samples=T, seed=1)
    x = images(n, dims, device, dtype)
    method, init, kwargs = METHODS[name]
    init = {key: model[value] for key, value in init.items()}
    kwargs = {key: (1,) + (2,) * dims if value == "window" else value for key, value in kwargs.items()}
    target = [2, 0][:n]
    expected_mean, expected_std = reference(mc_model, x, method, init, target=target, **kwargs)
    attribution = MCAttribution(method, mc_model, **init)
    for samples_per_call in (None, 2):
        mean, std = attribution.attribute(
            x, target=target, return_std=True, mc_samples_batch_size=samples_per_call, **kwargs
        )
        assert_close(mean, expected_mean, dtype)
        assert_close(std, expected_std, dtype)


def test_feature_permutation_permutes_within_each_sub_network(device):
    """Batched, it would permute rows of other sub-networks in: 0.495x at N=2."""
    model = dropout_net(2).to(device)
    mc_model = MCDropout(model, n_samples=T)
    x = images(2, 2, device)
    torch.manual_seed(3)
    expected, _ = reference(mc_model, x, FeaturePermutation, target=1)
    torch.manual_seed(3)
    ours = MCAttribution(FeaturePermutation, mc_model).attribute(x, target=1)
    assert_close(ours, expected, torch.float32)
    assert ours.abs().sum() > 0


def test_feature_permutation_warns_at_batch_size_one_as_captum_does(device, caplog):
    mc_model = MCDropout(dropout_net(2).to(device), n_samples=T)
    ours = MCAttribution(FeaturePermutation, mc_model).attribute(images(1, 2, device), target=1)
    assert not ours.any()
    assert "0th dim less than 2" in caplog.text


def test_deeplift_on_softmax_model_sees_only_its_own_rows(device):
    """Captum's nn.Softmax rule subtracts a mean over the whole batch."""
    model = dropout_net(2, softmax=True).to(device, torch.float64)
    mc_model = MCDropout(model, n_samples=T)
    x = images(2, 2, device, torch.float64)
    expected, _ = reference(mc_model, x, DeepLift, target=1)
    ours = MCAttribution(DeepLift, mc_model).attribute(x, target=1, mc_samples_batch_size=T)
    assert_close(ours, expected, torch.float64)


class RecordingGradientShap(GradientShap):
    def attribute(self, inputs, baselines, **kwargs):
        self.baseline_rows = baselines.shape[0]
        return super().attribute(inputs, baselines, **kwargs)


def test_baseline_distribution_is_not_replicated(device):
    mc_model = MCDropout(dropout_net(2).to(device), n_samples=T)
    x = images(2, 2, device)
    distribution = torch.randn(2, 1, 6, 6, device=device)  # as many rows as examples
    attribution = MCAttribution(RecordingGradientShap, mc_model)
    attribution.attribute(x, target=1, baselines=distribution, n_samples=4)
    assert attribution.attribution_method.baseline_rows == 2


def test_noise_tunnel_matches_seeded_loop(device):
    mc_model = MCDropout(dropout_net(2).to(device, torch.float64), n_samples=T)
    x = images(2, 2, device, torch.float64)
    kwargs = dict(target=1, nt_samples=3, stdevs=0.2)
    torch.manual_seed(5)
    expected = torch.stack(
        per_sub_network(mc_model, x, lambda: NoiseTunnel(Saliency(mc_model.model)).attribute(x, **kwargs))
    ).mean(0)
    torch.manual_seed(5)
    smooth = MCAttribution(lambda forward: NoiseTunnel(Saliency(forward)), mc_model)
    ours = smooth.attribute(x, mc_samples_batch_size=1, **kwargs)
    assert_close(ours, expected, torch.float64)


def test_neuron_and_activation_methods_get_no_target(device):
    model = dropout_net(2).to(device)
    mc_model = MCDropout(model, n_samples=T)
    x = images(2, 2, device)
    neuron, _ = reference(mc_model, x, NeuronGradient, {"layer": model[0]}, neuron_selector=(1, 2, 3))
    ours = MCAttribution(NeuronGradient, mc_model, layer=model[0]).attribute(x, neuron_selector=(1, 2, 3))
    assert_close(ours, neuron, torch.float32)
    activation, _ = reference(mc_model, x, LayerActivation, {"layer": model[6]})
    assert_close(MCAttribution(LayerActivation, mc_model, layer=model[6]).attribute(x), activation, torch.float32)


def test_several_layers_give_a_list(device):
    model = dropout_net(2).to(device)
    mc_model = MCDropout(model, n_samples=T)
    x = images(2, 2, device)
    layers = [model[0], model[7]]
    per_t = per_sub_network(mc_model, x, lambda: LayerActivation(model, layers).attribute(x))
    mean, std = MCAttribution(LayerActivation, mc_model, layer=layers).attribute(x, return_std=True)
    assert isinstance(mean, list) and isinstance(std, list) and len(mean) == 2
    for position in range(2):
        stacked = torch.stack([result[position] for result in per_t])
        assert_close(mean[position], stacked.mean(0), torch.float32)
        assert_close(std[position], stacked.std(0, correction=0), torch.float32)


def test_per_example_list_keywords_are_replicated(device):
    model = dropout_net(2).to(device, torch.float64)
    mc_model = MCDropout(model, n_samples=T)
    x = images(2, 2, device, torch.float64)
    expected, _ = reference(mc_model, x, ContrastSaliency, target=[1, 2], contrast_target=[0, 1])
    ours = MCAttribution(ContrastSaliency, mc_model).attribute(x, target=[1, 2], contrast_target=[0, 1])
    assert_close(ours, expected, torch.float64)


def test_convergence_delta_and_properties(device):
    model = dropout_net(2).to(device, torch.float64)
    mc_model = MCDropout(model, n_samples=T)
    x = images(2, 2, device, torch.float64)
    per_t = per_sub_network(
        mc_model, x,
        lambda: IntegratedGradients(model).attribute(x, target=1, n_steps=10, return_convergence_delta=True),
    )
    ig = MCAttribution(IntegratedGradients, mc_model)
    mean, std, delta = ig.attribute(x, target=1, n_steps=10, return_std=True, return_convergence_delta=True)
    assert_close(mean, torch.stack([a for a, _ in per_t]).mean(0), torch.float64)
    assert_close(delta, torch.stack([d for _, d in per_t]).mean(0), torch.float64)
    mean_only, delta_only = ig.attribute(x, target=1, n_steps=10, return_convergence_delta=True)
    assert torch.equal(mean_only, mean) and torch.equal(delta_only, delta)
    assert ig.has_convergence_delta() and ig.multiplies_by_inputs
    saliency = MCAttribution(Saliency, mc_model)
    assert not saliency.has_convergence_delta() and not saliency.multiplies_by_inputs


def test_forward_func_is_the_mean_model_and_unveiling_runs(device):
    model = dropout_net(2).to(device, torch.float64)
    mc_model = MCDropout(model, n_samples=T)
    x = images(2, 2, device, torch.float64)
    attribution = MCAttribution(Saliency, mc_model)
    torch.testing.assert_close(attribution.forward_func(x), mc_model(x).mean(0))
    result = IterativeUnveiling(attribution).unveil(x, target=1, n_iter=2, kernel_size=3)
    with torch.no_grad():
        assert_close(result.scores[:, 0], mc_model(x).mean(0)[:, 1], torch.float64)


def test_one_row_feature_mask_is_broadcast_at_batch_size_one(device):
    """A (1, H, W) mask broadcasts over (N, 1, H, W) inputs from the right: its
    first dimension is the channel, not the batch."""
    model = dropout_net(2).to(device, torch.float64)
    mc_model = MCDropout(model, n_samples=T)
    x = images(1, 2, device, torch.float64)
    feature_mask = (torch.arange(36, device=device).view(1, 6, 6) // 9)
    expected, _ = reference(mc_model, x, FeatureAblation, target=1, feature_mask=feature_mask)
    ours = MCAttribution(FeatureAblation, mc_model).attribute(x, target=1, feature_mask=feature_mask)
    assert_close(ours, expected, torch.float64)


def test_baselines_with_as_many_rows_as_the_replicated_batch_are_refused(device):
    mc_model = MCDropout(dropout_net(2).to(device), n_samples=T)
    x = images(1, 2, device)
    with pytest.raises(ValueError, match="baselines has 3 rows but inputs have 1 examples"):
        MCAttribution(IntegratedGradients, mc_model).attribute(x, target=1, baselines=torch.zeros(T, 1, 6, 6))
    with pytest.raises(ValueError, match=r"feature_mask has 3 rows but inputs have 1 examples"):
        MCAttribution(FeatureAblation, mc_model).attribute(
            x, target=1, feature_mask=torch.zeros(T, 1, 6, 6, dtype=torch.long)
        )


@pytest.mark.filterwarnings("ignore:Setting forward, backward hooks")
@pytest.mark.parametrize("method", [DeepLiftShap, RecordingGradientShap])
def test_unveiling_chunks_keep_the_distribution_whole_through_mc_attribution(device, method):
    """The distribution has N rows; splitting it per chunk changed the maps 0.56."""
    model = dropout_net(2).to(device, torch.float64)
    mc_model = MCDropout(model, n_samples=T)
    x = images(2, 2, device, torch.float64)
    distribution = 0.1 * images(2, 2, device, torch.float64).flip(0)
    unveiling = IterativeUnveiling(MCAttribution(method, mc_model))
    results = []
    for chunk in (None, 1):
        torch.manual_seed(0)
        np.random.seed(0)
        results.append(unveiling.unveil(
            x, target=1, n_iter=2, kernel_size=3, baselines=distribution, examples_batch_size=chunk
        ))
    if method is DeepLiftShap:  # deterministic: the same maps
        torch.testing.assert_close(results[1].attributions, results[0].attributions, rtol=1e-10, atol=1e-12)
    else:  # random draws differ per chunk; the distribution must reach each chunk whole
        assert unveiling.attribution_method.attribution_method.baseline_rows == 2


@pytest.mark.parametrize("wrap", ["noise_tunnel", "mc_attribution"])
@pytest.mark.parametrize("method", [NeuronGradient, LayerActivation])
def test_unveiling_wrapped_methods_without_target(device, wrap, method):
    model = dropout_net(2).to(device, torch.float64)
    mc_model = MCDropout(model, n_samples=T)
    x = images(2, 2, device, torch.float64)
    kwargs = {"neuron_selector": (1, 2, 2)} if method is NeuronGradient else {}
    if wrap == "noise_tunnel":
        wrapped, kwargs = NoiseTunnel(method(model, model[0])), {**kwargs, "nt_samples": 2, "stdevs": 0.0}
    else:
        wrapped = MCAttribution(method, mc_model, layer=model[0])
    result = IterativeUnveiling(wrapped).unveil(x, target=1, n_iter=2, kernel_size=3, **kwargs)
    assert result.n_found.min() > 0
