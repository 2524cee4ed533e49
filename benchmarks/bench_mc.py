"""MC dropout, batched over samples (MCDropout, MCAttribution) against a loop of T passes.

The loop is what baal and most MC-dropout code do: switch the dropout layers to train
mode and call the model (or the attribution method) T times. Ours replicates the batch
and runs all T sub-networks in one pass, or in chunks of ``mc_samples_batch_size``.
T = 20, batch 4, two small CNNs: on 1 x 28 x 28 inputs, where the cost of a pass is
mostly per-call overhead, and on 1 x 64 x 64 inputs, where it is mostly arithmetic.
Prints median times over repeats after warm-up and the speed-up, then the peak memory
of one call (tensor memory from the PyTorch profiler on CPU, allocator peak on CUDA).

    python benchmarks/bench_mc.py
"""

import argparse

import torch
from captum.attr import Saliency
from torch import nn

from captum_gradmask import MCAttribution, MCDropout

from _measure import interleaved_medians, peak_memory_mib

N_SAMPLES = 20
BATCH_SIZE = 4
CHUNKINGS = [None, 5, 1]  # mc_samples_batch_size; None: all T in one pass


def classifier():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Dropout2d(0.25),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Dropout2d(0.25),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(32, 2),
    )


def setup(side, device):
    torch.manual_seed(0)
    model = classifier().to(device).eval()
    images = torch.randn(BATCH_SIZE, 1, side, side, device=device)
    return model, images


class DropoutOn:
    """The usual MC-dropout switch: dropout layers in train mode, the rest in eval."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))]

    def __enter__(self):
        for layer in self.layers:
            layer.train()

    def __exit__(self, *exception):
        for layer in self.layers:
            layer.eval()


def loop_predict(model, images):
    with DropoutOn(model), torch.no_grad():
        return torch.stack([model(images) for _ in range(N_SAMPLES)])


def loop_saliency(model, images):
    saliency = Saliency(model)
    images = images.detach().requires_grad_()
    with DropoutOn(model):
        return torch.stack([saliency.attribute(images, target=1) for _ in range(N_SAMPLES)]).mean(0)


def batched_predict(mc_model, images, chunk):
    with torch.no_grad():
        return mc_model(images, mc_samples_batch_size=chunk)


def batched_saliency(mc_model, images, chunk):
    return MCAttribution(Saliency, mc_model).attribute(
        images, target=1, mc_samples_batch_size=chunk
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"T = {N_SAMPLES}, batch {BATCH_SIZE}, {device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} interleaved runs after warm-up\n"
    )
    print(
        f"{'inputs':<9} {'task':<11} {'loop (ms)':>10} "
        + " ".join(
            f"{'batched ' + str(chunk or N_SAMPLES) + ' (ms)':>19}" for chunk in CHUNKINGS[:2]
        )
        + f" {'speed-up':>9}"
    )
    for side in (28, 64):
        model, images = setup(side, device)
        mc_model = MCDropout(model, N_SAMPLES)
        for task, loop, batched in [
            ("prediction", loop_predict, batched_predict),
            ("saliency", loop_saliency, batched_saliency),
        ]:
            calls = {"loop": lambda: loop(model, images)}
            for chunk in CHUNKINGS[:2]:
                calls[chunk] = lambda chunk=chunk: batched(mc_model, images, chunk)
            medians = interleaved_medians(calls, args.repeats, device)
            loop_time = 1e3 * medians.pop("loop")
            batched_times = [1e3 * seconds for seconds in medians.values()]
            print(
                f"{side}x{side:<6} {task:<11} {loop_time:10.2f} "
                + " ".join(f"{t:19.2f}" for t in batched_times)
                + f" {loop_time / min(batched_times):8.2f}x"
            )

    model, images = setup(64, device)
    mc_model = MCDropout(model, N_SAMPLES)
    print(
        f"\npeak memory of one call, 64x64 inputs (MiB); batched with mc_samples_batch_size "
        f"= {CHUNKINGS}"
    )
    for task, loop, batched in [
        ("prediction", loop_predict, batched_predict),
        ("saliency", loop_saliency, batched_saliency),
    ]:
        loop_memory = peak_memory_mib(lambda: loop(model, images), device)
        batched_memory = [
            peak_memory_mib(lambda: batched(mc_model, images, c), device) for c in CHUNKINGS
        ]
        print(
            f"{task:<11} loop {loop_memory:7.1f}   batched "
            + "  ".join(f"{m:7.1f}" for m in batched_memory)
        )


if __name__ == "__main__":
    main()
