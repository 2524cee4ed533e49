"""Contrast saliency on a small lesion classifier.

Trains a small CNN to tell images with a bright round lesion (class 1) from images
without (class 0), then compares where Captum's Saliency and ContrastSaliency put
their mass: the share of attribution inside the lesion, on held-out lesion images.
Saves a figure of both maps.

    python examples/contrast_saliency.py --quick
"""

import argparse
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from captum.attr import Saliency  # noqa: E402
from torch import nn  # noqa: E402

from captum_gradmask import ContrastSaliency  # noqa: E402


def lesion_images(n, side, generator, device):
    """Noise images; odd-indexed ones get a Gaussian lesion. Returns x, y, lesion masks."""
    grid = torch.arange(side, device=device, dtype=torch.float32)
    centres = torch.randint(6, side - 6, (n, 2), generator=generator).to(device)
    squared_distance = (grid.view(1, -1, 1) - centres[:, 0].view(-1, 1, 1)) ** 2 + (
        grid.view(1, 1, -1) - centres[:, 1].view(-1, 1, 1)
    ) ** 2
    labels = torch.arange(n, device=device) % 2
    lesion = torch.exp(-squared_distance / 8.0) * labels.view(-1, 1, 1)
    noise = 0.3 * torch.randn(n, side, side, generator=generator).to(device)
    masks = (squared_distance <= 12.0) & (labels.view(-1, 1, 1) == 1)
    return (noise + lesion).unsqueeze(1), labels, masks.unsqueeze(1)


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2),
    )


def share_inside(attributions, masks):
    mass = attributions.abs().flatten(1)
    return ((mass * masks.flatten(1)).sum(1) / mass.sum(1)).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/contrast_saliency.png")
    args = parser.parse_args()

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x_train, y_train, _ = lesion_images(512, 32, generator, args.device)
    x_test, y_test, masks_test = lesion_images(128, 32, generator, args.device)

    model = small_cnn().to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150 if args.quick else 600):
        batch = torch.randint(0, len(x_train), (64,), generator=generator).to(args.device)
        loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    lesion_images_only = y_test == 1
    x_lesion, lesion_masks = x_test[lesion_images_only], masks_test[lesion_images_only]
    saliency = Saliency(model).attribute(x_lesion, target=1)
    contrast = ContrastSaliency(model).attribute(x_lesion, target=1, contrast_target=0)

    print(f"test accuracy                     {accuracy:.3f}")
    print(f"lesion area / image               {lesion_masks.float().mean().item():.3f}")
    print(f"Saliency mass inside lesion       {share_inside(saliency, lesion_masks):.3f}")
    print(f"ContrastSaliency mass inside      {share_inside(contrast, lesion_masks):.3f}")

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(3, 4, figsize=(8, 6))
    for column in range(4):
        for row, (image, title) in enumerate(
            [(x_lesion, "image"), (saliency, "Saliency"), (contrast, "ContrastSaliency")]
        ):
            axes[row, column].imshow(image[column, 0].detach().cpu(), cmap="gray" if row == 0 else "hot")
            axes[row, column].contour(lesion_masks[column, 0].cpu(), levels=[0.5], colors="cyan", linewidths=0.8)
            axes[row, column].set_axis_off()
            axes[row, 0].set_title(title, fontsize=9, loc="left")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    print(f"figure saved to {out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
