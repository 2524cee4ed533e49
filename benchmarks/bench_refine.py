"""Timing of refine_mask and of iterative unveiling's own overhead.

1. refine_mask at 16x1x512x512, k = 11, 3 passes, against the same semantics written
   with scipy.ndimage.uniform_filter (NumPy, CPU) and with torch conv2d and a ones
   kernel.
2. refine_mask from k = 5 to k = 51: cumulative sums make the cost flat in k.
3. IterativeUnveiling: the share of its time spent outside the wrapped attribution
   calls, split into the score forwards and the rest (refinement, masking).

Medians over --repeats runs after one warm-up run, all in this process; the
compared functions run in turn, so load from other processes hits them alike.

    python benchmarks/bench_refine.py --quick
"""

import argparse
import time
import warnings

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from captum.attr import Attribution, GuidedBackprop, NoiseTunnel, Saliency
from torch import nn

from captum_gradmask.refine import refine_mask
from captum_gradmask.unveiling import IterativeUnveiling

from _measure import interleaved_medians, synchronize

THRESHOLD = 0.5
N_PASSES = 3


def scipy_refine(attributions: np.ndarray, kernel_size: int) -> np.ndarray:
    """refine_mask's semantics with scipy's box filter (one sample axis, one channel)."""
    saliency = np.abs(attributions).max(axis=1, keepdims=True)
    saliency = saliency / saliency.max(axis=(1, 2, 3), keepdims=True)
    box = (1, 1, kernel_size, kernel_size)
    for _ in range(N_PASSES):
        saliency = scipy.ndimage.uniform_filter(saliency, size=box, mode="constant")
    saliency = saliency / saliency.max(axis=(1, 2, 3), keepdims=True)
    return saliency >= THRESHOLD


def conv_refine(attributions: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """refine_mask's semantics with conv2d and a ones kernel: cost grows with k**2."""
    ones = torch.full((1, 1, kernel_size, kernel_size), 1 / kernel_size**2,
                      device=attributions.device, dtype=attributions.dtype)
    saliency = attributions.abs().amax(dim=1, keepdim=True)
    saliency = saliency / saliency.amax(dim=(1, 2, 3), keepdim=True)
    for _ in range(N_PASSES):
        saliency = F.conv2d(saliency, ones, padding=kernel_size // 2)
    saliency = saliency / saliency.amax(dim=(1, 2, 3), keepdim=True)
    return saliency >= THRESHOLD


def bench_against_alternatives(args):
    generator = torch.Generator().manual_seed(0)
    attributions = torch.rand(16, 1, args.side, args.side, generator=generator).to(args.device)
    kernel_size = 11
    as_numpy = attributions.cpu().numpy()
    medians = interleaved_medians(
        {
            "ours": lambda: refine_mask(attributions, kernel_size, N_PASSES, THRESHOLD),
            "conv": lambda: conv_refine(attributions, kernel_size),
            "scipy": lambda: scipy_refine(as_numpy, kernel_size),
        },
        args.repeats, args.device,
    )
    ours, conv, scipy_time = medians["ours"], medians["conv"], medians["scipy"]
    agreement = (refine_mask(attributions, kernel_size).cpu().numpy()
                 == scipy_refine(as_numpy, kernel_size)).mean()
    print(f"\n1. refine_mask, 16x1x{args.side}x{args.side} float32, k=11, 3 passes "
          f"({torch.get_num_threads()} torch threads, {args.device})")
    print(f"   ours (cumsum box)        {ours * 1e3:8.1f} ms")
    print(f"   scipy uniform_filter     {scipy_time * 1e3:8.1f} ms   "
          f"scipy / ours = {scipy_time / ours:.2f}x   (CPU; masks agree on {agreement:.6%} of pixels)")
    print("   (scipy's one-pass filter is the faster on the CPU; ours runs on the tensors' device,\n"
          "    on the GPU too, and needs no copy to NumPy)")
    print(f"   torch conv2d ones kernel {conv * 1e3:8.1f} ms   conv / ours  = {conv / ours:.2f}x")


def bench_kernel_sizes(args):
    generator = torch.Generator().manual_seed(1)
    attributions = torch.rand(16, 1, args.side, args.side, generator=generator).to(args.device)
    print("\n2. refine_mask against kernel size (same input, 3 passes)")
    kernel_sizes = (5, 11, 21, 31, 51)
    medians = interleaved_medians(
        {k: (lambda k=k: refine_mask(attributions, k, N_PASSES, THRESHOLD)) for k in kernel_sizes},
        args.repeats, args.device,
    )
    for kernel_size in kernel_sizes:
        print(f"   k={kernel_size:2d}  {medians[kernel_size] * 1e3:8.1f} ms")
    print(f"   k=51 / k=5 = {medians[51] / medians[5]:.2f}x")


class TimedAttribution(Attribution):
    """Wraps an attribution method and adds up the seconds spent in it."""

    def __init__(self, attribution_method, device):
        super().__init__(attribution_method.forward_func)
        self.attribution_method = attribution_method
        self.device = device
        self.seconds = 0.0

    def attribute(self, inputs, **kwargs):
        synchronize(self.device)
        start = time.perf_counter()
        attributions = self.attribution_method.attribute(inputs, **kwargs)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return attributions


class TimedScoring(nn.Module):
    """The model, adding up the seconds of forwards run without grad (the scores)."""

    def __init__(self, model, device):
        super().__init__()
        self.model = model
        self.device = device
        self.seconds = 0.0

    def forward(self, inputs):
        if torch.is_grad_enabled():
            return self.model(inputs)
        synchronize(self.device)
        start = time.perf_counter()
        outputs = self.model(inputs)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return outputs


def image_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2),
    )


def bench_unveiling_overhead(args):
    torch.manual_seed(2)
    model = TimedScoring(image_cnn(), args.device).to(args.device).eval()
    images = torch.randn(16, 1, args.unveil_side, args.unveil_side, device=args.device)
    methods = {
        "Saliency": (Saliency(model), {}),
        "NoiseTunnel(GuidedBackprop), 10 samples": (
            NoiseTunnel(GuidedBackprop(model)), {"nt_samples": 10, "nt_samples_batch_size": 5}),
    }
    print(f"\n3. IterativeUnveiling, 16x1x{args.unveil_side}x{args.unveil_side}, small CNN, "
          f"5 iterations, k=11: share of time outside the wrapped attribution calls")
    for name, (method, kwargs) in methods.items():
        timed = TimedAttribution(method, args.device)
        unveiling = IterativeUnveiling(timed)
        run = lambda: unveiling.unveil(images, target=1, n_iter=5, **kwargs)  # noqa: E731
        run()  # warm-up
        timed.seconds = model.seconds = 0.0
        synchronize(args.device)
        start = time.perf_counter()
        for _ in range(args.repeats):
            run()
        synchronize(args.device)
        total = time.perf_counter() - start
        outside = total - timed.seconds
        own = outside - model.seconds
        print(f"   {name:42s} total {total / args.repeats * 1e3:7.1f} ms/run; outside "
              f"attribution {outside / total:6.1%} = score forwards {model.seconds / total:6.1%}"
              f" + refine/masking {own / total:6.1%}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    args.side, args.unveil_side = 512, 128
    warnings.filterwarnings("ignore", category=UserWarning, module="captum")
    bench_against_alternatives(args)
    bench_kernel_sizes(args)
    bench_unveiling_overhead(args)


if __name__ == "__main__":
    main()
