"""Every batched path has a ``*_batch_size`` knob that bounds its peak memory.

MC samples (``mc_samples_batch_size`` of MCDropout, its uncertainty and
MCAttribution), noise samples (Captum's ``nt_samples_batch_size``, passed through
MCAttribution and IterativeUnveiling) and unveiled examples
(``examples_batch_size``). For each, the peak tensor memory of one call is measured
(PyTorch profiler on CPU, allocator peak on CUDA) as the number of samples grows
4x: with the knob it stays within 1.5x, without it it grows at least 2.5x, which
shows the measurement sees the samples.
"""

import pytest
import torch
from captum.attr import NoiseTunnel, Saliency
from torch import nn

from benchmarks._measure import peak_memory_mib
from captum_gradmask import IterativeUnveiling, MCAttribution, MCDropout

SIDE = 32
FEW, MANY = 4, 16
CHUNK = 2

pytestmark = pytest.mark.usefixtures("one_thread")


def wide_cnn(device, dropout=nn.Dropout2d):
    """Activations (16 x 32 x 32 per sample) dominate the memory of a call; with
    element-wise dropout its masks are as large."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        dropout(0.2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    ).to(device).eval()


def images(device, n=2):
    return torch.rand(n, 1, SIDE, SIDE, device=device)


def peaks(call, device):
    """Peak memory of ``call(count, batch_size)`` for FEW and MANY samples, chunked
    by CHUNK and not chunked."""
    call(FEW, CHUNK)  # warm-up: one-time allocations stay out of the measurement
    return {
        (count, chunk): peak_memory_mib(lambda: call(count, chunk), device)
        for count in (FEW, MANY)
        for chunk in (CHUNK, None)
    }


def assert_bounded(peak):
    assert peak[MANY, CHUNK] <= 1.5 * peak[FEW, CHUNK], peak
    assert peak[MANY, None] >= 2.5 * peak[FEW, None], peak


def segmentation_cnn(device):
    """Per-pixel outputs (4 x 32 x 32), as large as the activations: the uncertainty
    maps must be summed pass by pass, not from all T outputs at once."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.Conv2d(8, 4, 1)
    ).to(device).eval()


@pytest.mark.parametrize("network", ["channel", "element", "segmentation"])
def test_mc_dropout_samples(device, network):
    builders = {
        "channel": lambda: wide_cnn(device, nn.Dropout2d),
        "element": lambda: wide_cnn(device, nn.Dropout),
        "segmentation": lambda: segmentation_cnn(device),
    }
    model, x = builders[network](), images(device)

    def predict(n_samples, chunk):
        with torch.no_grad():
            return MCDropout(model, n_samples).uncertainty(x, mc_samples_batch_size=chunk)

    assert_bounded(peaks(predict, device))


@pytest.mark.parametrize("dropout", [nn.Dropout2d, nn.Dropout])
def test_mc_attribution_samples(device, dropout):
    model, x = wide_cnn(device, dropout), images(device)

    def attribute(n_samples, chunk):
        attribution = MCAttribution(Saliency, MCDropout(model, n_samples))
        return attribution.attribute(x, target=1, mc_samples_batch_size=chunk, return_std=True)

    assert_bounded(peaks(attribute, device))


def test_noise_samples_through_mc_attribution(device):
    model, x = wide_cnn(device), images(device)
    smooth_grad = lambda sub_networks: NoiseTunnel(Saliency(sub_networks))  # noqa: E731
    attribution = MCAttribution(smooth_grad, MCDropout(model, 2))

    def attribute(nt_samples, chunk):
        return attribution.attribute(
            x, target=1, nt_samples=nt_samples, nt_samples_batch_size=chunk
        )

    assert_bounded(peaks(attribute, device))


def test_noise_samples_through_unveiling(device):
    model, x = wide_cnn(device), images(device)
    unveiling = IterativeUnveiling(NoiseTunnel(Saliency(model)))

    def unveil(nt_samples, chunk):
        return unveiling.unveil(
            x, target=1, n_iter=2, kernel_size=5, nt_samples=nt_samples,
            nt_samples_batch_size=chunk,
        )

    assert_bounded(peaks(unveil, device))


def test_unveiled_examples(device):
    model = wide_cnn(device)
    unveiling = IterativeUnveiling(Saliency(model))
    inputs = {count: images(device, count) for count in (FEW, MANY)}

    def unveil(n_examples, chunk):
        return unveiling.unveil(
            inputs[n_examples], target=1, n_iter=2, kernel_size=5, examples_batch_size=chunk
        )

    assert_bounded(peaks(unveil, device))
