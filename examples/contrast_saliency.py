"""What ContrastSaliency removes: evidence that moves both outputs alike.

A small CNN reads two findings from noisy 32 x 32 images: finding A (a bright blob in
the left half) and finding B (one in the right half), each with its own sigmoid
output, as multi-label medical classifiers do. Brighter scans carry more findings of
both kinds (as a scanner or population effect would make them), so both outputs also
learn to rise with the overall brightness. On test images with both findings,
Captum's Saliency of output A answers "what raises A?": finding A, and the brightness
of the whole image. ContrastSaliency of A against B answers "what tells A from B?":
the brightness moves both alike and drops out. Prints, for both maps, how much the
explained quantity moves with the image's brightness (the map's signed sum: the
derivative along a uniform brightness change) and the share of the map's mass inside
finding A and B (the contrast map shows B as much as A, with the opposite sign: B is
the evidence against A); saves a figure drawn with ``captum_gradmask.viz``.

    python examples/contrast_saliency.py --quick
"""

import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402
from captum.attr import Saliency  # noqa: E402
from torch import nn  # noqa: E402

from _common import example_arguments, train_on_minibatches  # noqa: E402
from captum_gradmask import ContrastSaliency, viz  # noqa: E402

SIDE = 32


def findings_images(n, generator, device):
    """Images, labels (N, 2) for findings A and B, and their masks (N, 2, H, W)."""
    brightness = torch.rand(n, generator=generator) - 0.5
    probability = torch.sigmoid(4 * brightness)  # brighter scans carry more findings
    labels = (torch.rand(n, 2, generator=generator) < probability[:, None]).float()
    grid = torch.arange(SIDE, dtype=torch.float32)
    rows = torch.randint(6, SIDE - 6, (n, 2), generator=generator).float()
    columns = torch.stack([
        torch.randint(4, SIDE // 2 - 4, (n,), generator=generator),
        torch.randint(SIDE // 2 + 4, SIDE - 4, (n,), generator=generator),
    ], dim=1).float()
    squared_distance = (grid.view(1, 1, -1, 1) - rows[..., None, None]) ** 2 + (
        grid.view(1, 1, 1, -1) - columns[..., None, None]
    ) ** 2  # (N, 2, H, W)
    blobs = torch.exp(-squared_distance / 6.0) * labels[..., None, None]
    masks = (squared_distance <= 9.0) & (labels[..., None, None] == 1)
    noise = 0.3 * torch.randn(n, 1, SIDE, SIDE, generator=generator)
    images = noise + blobs.sum(1, keepdim=True) + brightness.view(-1, 1, 1, 1)
    return images.to(device), labels.to(device), masks.to(device)


def small_cnn():
    """Max-pooled over each half of the image, so it can tell left (A) from right (B)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d((1, 2)), nn.Flatten(), nn.Linear(32, 2),
    )


def share_inside(attributions, mask):
    mass = attributions.abs().flatten(1)
    return ((mass * mask.flatten(1)).sum(1) / mass.sum(1)).mean().item()


def brightness_sensitivity(signed_attributions):
    """How much the explained quantity moves per unit of uniform brightness: the sum
    of its input gradient over the image (mean absolute value over images)."""
    return signed_attributions.flatten(1).sum(1).abs().mean().item()


def main():
    args = example_arguments(__doc__, "outputs/contrast_saliency.png", "fewer training steps")

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x_train, y_train, _ = findings_images(2048, generator, args.device)
    x_test, y_test, masks_test = findings_images(512, generator, args.device)
    model = train_on_minibatches(
        small_cnn().to(args.device), x_train, y_train, nn.functional.binary_cross_entropy_with_logits,
        300 if args.quick else 1200, generator,
    )

    with torch.no_grad():
        accuracy = ((model(x_test) > 0).float() == y_test).float().mean(0).tolist()
    both = (y_test == 1).all(1)
    images, masks = x_test[both].requires_grad_(), masks_test[both]
    maps = {
        "Saliency, output A": Saliency(model).attribute(images, target=0, abs=False),
        "ContrastSaliency, A vs B": ContrastSaliency(model).attribute(images, target=0, contrast_target=1, abs=False),
    }
    print(f"test accuracy: finding A {accuracy[0]:.3f}, finding B {accuracy[1]:.3f}; "
          f"{len(images)} test images with both findings\n")
    print(f"{'map':<26} {'brightness sensitivity':>23} {'mass in A':>10} {'mass in B':>10}")
    for name, attribution in maps.items():
        print(f"{name:<26} {brightness_sensitivity(attribution):23.3f} "
              f"{share_inside(attribution, masks[:, :1]):10.3f} {share_inside(attribution, masks[:, 1:]):10.3f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = viz.map_grid(images, maps, masks, signed=True, colour_bar_label="signed gradient")
    figure.suptitle("finding A: lime contour, B: orange. ContrastSaliency is the gradient of |z_A - z_B|: "
                    "its sign follows whichever of A and B scores higher in that image", fontsize=9)
    figure.savefig(out, dpi=100)
    print(f"\nfigure saved to {out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
