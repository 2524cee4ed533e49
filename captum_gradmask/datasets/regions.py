"""Synthetic multi-lesion images: several round regions of different strength.

A benchmark for iterative unveiling: every positive image holds the same number of
bright blobs at random, well-separated places, strongest first in ``regions``. A
classifier can tell positives from negatives by the strongest blob alone, and a
single saliency map tends to show only that one. Random numbers are drawn on the
CPU from a private generator, so a seed gives the same images on every device and
the global random state is not touched.
"""

import math
from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

from ._common import check_count


class RegionImages(NamedTuple):
    images: Tensor  #: (N, 1, size, size) float: blobs plus Gaussian noise
    labels: Tensor  #: (N,) long: 1 for images with regions (odd indices), else 0
    regions: Tensor  #: (N, R, 1, size, size) bool, strongest region first; empty if label 0


def multi_region_images(
    n_images: int,
    size: int = 64,
    strengths: Sequence[float] = (1.0, 0.6, 0.35),
    radius: float = 3.0,
    noise_std: float = 0.15,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RegionImages:
    r"""Generate images with one Gaussian blob per entry of ``strengths``.

    Odd-indexed images get the blobs, even-indexed ones are noise only. Blob r has
    peak ``strengths[r]`` and standard deviation ``radius / 2``; its ground-truth
    region is the disc of ``radius`` around its centre. Centres lie in distinct
    cells of a grid over the image, jittered, so regions never touch.

    Args:
        n_images (int): number of images N.
        size (int): side of the square images in pixels. Default: 64
        strengths (sequence of float): blob peaks, one region each. Default:
            (1.0, 0.6, 0.35)
        radius (float): region radius in pixels. Default: 3.0
        noise_std (float): standard deviation of the pixel noise. Default: 0.15
        seed (int): seed of the private generator. Default: 0
        device (str or torch.device): where the images are returned. Default: "cpu"
        dtype (torch.dtype): floating-point dtype of ``images``. Default: float32

    Returns:
        RegionImages: images, labels and per-region masks.

    Examples::

        >>> data = multi_region_images(8, seed=0)
        >>> data.images.shape, data.regions.shape
        (torch.Size([8, 1, 64, 64]), torch.Size([8, 3, 1, 64, 64]))
    """
    n_regions = len(strengths)
    cells_per_side = math.ceil(math.sqrt(2 * n_regions))
    cell = size / cells_per_side if isinstance(size, int) else 0
    _check_arguments(n_images, size, n_regions, radius, noise_std, cell)
    generator = torch.Generator().manual_seed(seed)

    cell_order = torch.rand(n_images, cells_per_side**2, generator=generator).argsort(dim=1)
    chosen_cells = cell_order[:, :n_regions]  # (N, R) distinct cells per image
    cell_corner = torch.stack(
        (chosen_cells // cells_per_side, chosen_cells % cells_per_side), dim=-1
    ) * cell
    jitter_range = cell - 6 * radius  # centres at least 6 radii apart
    jitter = (torch.rand(n_images, n_regions, 2, generator=generator) - 0.5) * jitter_range
    centres = cell_corner + cell / 2 + jitter  # (N, R, 2) row, column

    grid = torch.arange(size, dtype=torch.float64)
    squared_distance = (grid.view(1, 1, -1, 1) - centres[..., 0, None, None]) ** 2 + (
        grid.view(1, 1, 1, -1) - centres[..., 1, None, None]
    ) ** 2  # (N, R, size, size)
    labels = torch.arange(n_images) % 2
    present = labels.view(-1, 1, 1, 1) == 1
    peaks = torch.tensor(strengths, dtype=torch.float64).view(1, -1, 1, 1)
    blobs = peaks * torch.exp(-squared_distance / (2 * (radius / 2) ** 2)) * present
    noise = torch.randn(n_images, 1, size, size, generator=generator, dtype=torch.float64)
    noise *= noise_std
    images = blobs.sum(dim=1, keepdim=True) + noise
    regions = (squared_distance <= radius**2) & present
    return RegionImages(
        images=images.to(device=device, dtype=dtype),
        labels=labels.to(device),
        regions=regions.unsqueeze(2).to(device),
    )


def _check_arguments(
    n_images: object, size: object, n_regions: int, radius: float, noise_std: float, cell: float
) -> None:
    check_count("n_images", n_images)
    check_count("size", size, minimum=8)
    if n_regions < 1:
        raise ValueError("strengths must hold at least one value")
    if not radius > 0 or cell < 6 * radius:
        raise ValueError(
            f"radius must be > 0 and at most a sixth of a grid cell ({cell:.1f} "
            f"pixels for {n_regions} regions in {size} pixels), got {radius!r}"
        )
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
