"""MC dropout and GradMask on MONAI's networks (an optional extra; skipped without
MONAI), small sizes, float32, eval mode, batch 1 and 2: every stochastic layer
sampled (dropout, stochastic depth, EfficientNet's drop_connect, window attention),
against each sub-network run on its own (tests/helpers.py ``per_sub_network``: masks
probed from outside, applied by hooks on the plain model)."""

import warnings

import pytest
import torch
from captum.attr import IntegratedGradients, Saliency
from torch import nn

from captum_gradmask import IterativeUnveiling, MCAttribution, MCDropout, gradmask_penalty
from helpers import per_sub_network

nets = pytest.importorskip("monai.networks.nets", reason="MONAI is an optional extra")
pytest.importorskip("einops", reason="MONAI's transformer networks need einops")

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]
T = 3


class Logits(nn.Module):
    """ViT returns (logits, hidden states): MCDropout needs one Tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]


NETWORKS = {  # name: (build, input shape of one example, segmentation?)
    "DenseNet121 2-D": (lambda: nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=2, dropout_prob=0.2), (1, 32, 32), False),
    "ResNet-18 3-D": (lambda: nn.Sequential(nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=8), nn.Dropout(0.2), nn.Linear(8, 2)), (1, 24, 24, 24), False),
    "EfficientNetBN 2-D": (lambda: nets.EfficientNetBN("efficientnet-b0", spatial_dims=2, in_channels=1, num_classes=2, pretrained=False), (1, 32, 32), False),
    "ViT 2-D": (lambda: Logits(nets.ViT(in_channels=1, img_size=(32, 32), patch_size=(8, 8), spatial_dims=2, hidden_size=48, mlp_dim=96, num_heads=4, num_layers=2, classification=True, num_classes=2, dropout_rate=0.2, post_activation=None)), (1, 32, 32), False),
    "UNet 3-D": (lambda: nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), dropout=0.2), (1, 24, 24, 24), True),
    "BasicUNet 2-D": (lambda: nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4), dropout=0.2), (1, 32, 32), True),
    "SegResNet 3-D": (lambda: nets.SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8, dropout_prob=0.2), (1, 24, 24, 24), True),
    "UNETR 3-D": (lambda: nets.UNETR(in_channels=1, out_channels=2, img_size=(32, 32, 32), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4, dropout_rate=0.2), (1, 32, 32, 32), True),
    "SwinUNETR 2-D": (lambda: nets.SwinUNETR(in_channels=1, out_channels=2, spatial_dims=2, feature_size=12, drop_rate=0.1, attn_drop_rate=0.1, dropout_path_rate=0.2), (1, 64, 64), True),
}


# Untrained, EfficientNet's activations reach 1e6: float32 rounding then differs
# between batch sizes by 1e-3 of the largest saliency, so it runs in float64.
FLOAT64 = {"EfficientNetBN 2-D"}


def network(name, device, n):
    build, shape, segmentation = NETWORKS[name]
    torch.manual_seed(0)
    dtype = torch.float64 if name in FLOAT64 else torch.float32
    model = with_calibrated_statistics(build(), shape).to(device, dtype).eval()
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(n)).to(device, dtype)
    return model, x, segmentation


def with_calibrated_statistics(model, shape):
    """BatchNorm running statistics of one batch, as after training (with MONAI's
    initial ones EfficientNet's activations vanish: logits of 1e-14)."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()  # only BatchNorm: no dropout while calibrating
            module.momentum = None  # cumulative average: after one batch, its statistics
    with torch.no_grad():
        model(torch.randn(8, *shape))
    return model


def assert_close(actual, expected):
    scale = expected.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("name", NETWORKS)
def test_sub_networks_equal_each_one_on_its_own(device, name, n):
    model, x, _ = network(name, device, n)
    mc_model = MCDropout(model, n_samples=T)
    with torch.no_grad():
        outputs = mc_model(x)
        expected = torch.stack(per_sub_network(mc_model, x, lambda: model(x)))
        chunked = mc_model(x, mc_samples_batch_size=1)
    assert_close(outputs, expected)
    assert_close(chunked, outputs)
    assert not torch.allclose(outputs[0], outputs[1]), "the sub-networks should differ"


def test_every_kind_of_stochastic_layer_is_found():
    kinds = {
        name: sorted({layer.mask_kind for layer in MCDropout(NETWORKS[name][0]()).stochastic_layers})
        for name in ("EfficientNetBN 2-D", "SwinUNETR 2-D", "SegResNet 3-D")
    }
    assert kinds == {
        "EfficientNetBN 2-D": ["element", "sample"],  # dropout, drop_connect
        "SwinUNETR 2-D": ["element", "sample"],  # window attention dropout, DropPath
        "SegResNet 3-D": ["channel"],
    }


def target_of(segmentation, model):
    """A classifier's logits, or a segmentation net's foreground logit summed over the image."""
    if not segmentation:
        return model
    return lambda x: model(x)[:, :, ...].flatten(2).mean(2)


@pytest.mark.parametrize("name", NETWORKS)
def test_mc_attribution_and_unveiling(device, name):
    model, x, segmentation = network(name, device, 2)
    mc_model = MCDropout(model, n_samples=T)
    target = 1 if not segmentation else (1,) + tuple(s // 2 for s in x.shape[2:])
    per_t = per_sub_network(mc_model, x, lambda: Saliency(model).attribute(x, target=target))
    ours, std = MCAttribution(Saliency, mc_model).attribute(x, target=target, return_std=True)
    assert_close(ours, torch.stack(per_t).mean(0))
    assert_close(std, torch.stack(per_t).std(0, correction=0))
    result = IterativeUnveiling(MCAttribution(Saliency, mc_model)).unveil(x, target=target, n_iter=2, kernel_size=5)
    assert result.masks.shape == (2, 2, 1, *x.shape[2:]) and result.n_found.min() > 0


@pytest.mark.parametrize("name", NETWORKS)
def test_gradmask_exact_and_forward_mode_agree(device, name):
    """GradMask wants (N, C) logits: a segmentation network's are averaged over the
    image. forward_mode (no double backward) against exact (double backprop)."""
    model, x, segmentation = network(name, device, 1)
    mask = torch.zeros_like(x)
    mask[(..., *[slice(side // 4, 3 * side // 4) for side in x.shape[2:]])] = 1
    logits = (lambda inputs: model(inputs).flatten(2).mean(2)) if segmentation else model
    exact = gradmask_penalty(logits, x, mask).penalty
    forward = gradmask_penalty(logits, x, mask, method="forward_mode").penalty
    torch.testing.assert_close(forward, exact, rtol=1e-4, atol=0)
    parameters = [p for p in model.parameters() if p.requires_grad]
    exact_gradients = torch.autograd.grad(exact, parameters, allow_unused=True)
    forward_gradients = torch.autograd.grad(forward, parameters, allow_unused=True)
    flat = lambda gradients: torch.cat([g.flatten() for g in gradients if g is not None])  # noqa: E731
    difference = (flat(forward_gradients) - flat(exact_gradients)).norm() / flat(exact_gradients).norm()
    assert exact > 0 and difference < 1e-3


def test_integrated_gradients_completeness_on_unet(device):
    model, x, _ = network("UNet 3-D", device, 1)
    mc_model = MCDropout(model.double(), n_samples=T)
    x = x.double()
    target = (1, 12, 12, 12)
    attributions, delta = MCAttribution(IntegratedGradients, mc_model).attribute(
        x, target=target, n_steps=64, return_convergence_delta=True
    )
    assert delta.abs().max() < 1e-2 * attributions.abs().sum()


def test_sliding_window_inference_equals_whole_volume(device):
    """One window covering the volume gives mc_model(x); smaller windows run."""
    from captum_gradmask import mc_sliding_window_inference, predictive_uncertainty

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.3), nn.Conv3d(4, 2, 1))
    model = model.to(device).eval()
    x = torch.randn(2, 1, 16, 16, 16, device=device)
    mc_model = MCDropout(model, n_samples=T)
    with torch.no_grad():
        whole = mc_model(x)
        one_window = mc_sliding_window_inference(mc_model, x, roi_size=16)
    torch.testing.assert_close(one_window, whole, rtol=1e-6, atol=1e-6)
    maps = predictive_uncertainty(one_window.softmax(dim=2))
    torch.testing.assert_close(maps.mutual_information, mc_model.uncertainty(x).mutual_information.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        windows = mc_sliding_window_inference(mc_model, x, roi_size=8, sw_batch_size=2, mc_samples_batch_size=1)
    assert windows.shape == whole.shape and torch.isfinite(windows).all()


def test_meta_tensor_batches_from_monai_reach_save_image(device, tmp_path):
    """A DataLoader's MetaTensor batch: outputs equal the plain tensor's; the (T, N, ...)
    stack decollates per example after a transpose, and uncertainty maps, given a
    channel, go to SaveImage with each volume's metadata."""
    from monai.data import MetaTensor, decollate_batch, list_data_collate
    from monai.transforms import SaveImage

    model, x, _ = network("UNet 3-D", device, 2)
    batch = list_data_collate([
        {"image": MetaTensor(volume, meta={"filename_or_obj": f"volume{i}.nii"})} for i, volume in enumerate(x)
    ])["image"]
    mc_model = MCDropout(model, n_samples=T)
    with torch.no_grad():
        stacked = mc_model(batch)
        torch.testing.assert_close(stacked.as_tensor(), mc_model(x))
        maps = mc_model.uncertainty(batch)
    per_example = decollate_batch(stacked.transpose(0, 1))
    assert [item.meta["filename_or_obj"] for item in per_example] == ["volume0.nii", "volume1.nii"]
    assert per_example[0].shape == (T, 2, 24, 24, 24)
    save = SaveImage(output_dir=tmp_path, output_postfix="mi", separate_folder=False, print_log=False)
    for item in decollate_batch(maps.mutual_information.unsqueeze(1)):
        save(item)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["volume0_mi.nii.gz", "volume1_mi.nii.gz"]


def test_checkpointed_unet_equals_the_plain_unet(device):
    """MONAI's CheckpointUNet recomputes its blocks in backward: MCAttribution still
    equals the plain UNet with the same weights."""
    from monai.networks.nets.unet import CheckpointUNet

    options = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), dropout=0.2)
    torch.manual_seed(0)
    plain_unet = nets.UNet(**options).to(device).eval()
    torch.manual_seed(0)
    checkpointed = CheckpointUNet(**options).to(device).eval()
    x = torch.randn(1, 1, 24, 24, 24, device=device)
    target = (1, 12, 12, 12)
    ours = MCAttribution(Saliency, MCDropout(checkpointed, n_samples=T)).attribute(x, target=target)
    plain = MCAttribution(Saliency, MCDropout(plain_unet, n_samples=T)).attribute(x, target=target)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    assert ours.abs().sum() > 0
    # and a backward through the MC outputs themselves
    gradients = []
    for unet in (checkpointed, plain_unet):
        leaf = x.clone().requires_grad_()
        MCDropout(unet, n_samples=T)(leaf, mc_samples_batch_size=2)[:, :, 1].mean().backward()
        gradients.append(leaf.grad)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-5, atol=1e-7)


def test_sliding_window_overlap_with_element_wise_dropout(device):
    """Element-wise masks repeat window by window: blending overlapping windows lowers
    the mutual information, so it warns; channel-wise dropout does not."""
    from captum_gradmask import mc_sliding_window_inference, predictive_uncertainty

    torch.manual_seed(0)
    unet = nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
                     num_res_units=1, dropout=0.3, norm="BATCH").to(device).eval()
    x = torch.randn(1, 1, 32, 32, 32, device=device)
    mc_model = MCDropout(unet, n_samples=8)

    def mean_mutual_information(**options):
        with torch.no_grad():
            logits = mc_sliding_window_inference(mc_model, x, roi_size=16, **options)
        return predictive_uncertainty(logits.softmax(dim=2)).mutual_information.mean().item()

    without_overlap = mean_mutual_information()
    with pytest.warns(UserWarning, match="blending overlapping windows lowers the spread"):
        with_overlap = mean_mutual_information(overlap=0.5)
    assert with_overlap < 0.7 * without_overlap
    channel_wise = MCDropout(network("SegResNet 3-D", device, 1)[0], n_samples=T)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            mc_sliding_window_inference(channel_wise, x[:, :, :24, :24, :24], roi_size=16, overlap=0.5)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(roi_size=0), "roi_size must be an int >= 1"),
        (dict(roi_size=(8, 8, 0)), "roi_size must be an int >= 1"),
        (dict(roi_size=8, sw_batch_size=0), "sw_batch_size must be an int >= 1"),
        (dict(roi_size=8, overlap=1.0), r"overlap must be a number in \[0, 1\)"),
    ],
)
def test_sliding_window_argument_errors(options, message):
    from captum_gradmask import mc_sliding_window_inference

    mc_model = MCDropout(nn.Sequential(nn.Conv3d(1, 2, 1), nn.Dropout3d(0.2)), n_samples=2)
    with pytest.raises(ValueError, match=message):
        mc_sliding_window_inference(mc_model, torch.zeros(1, 1, 8, 8, 8), **options)
