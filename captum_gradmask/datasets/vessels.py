"""Synthetic retinal fundus images: a vessel tree, an optic disc, optional lesions.

A stand-in for retinal-vessel segmentation data (e.g. DRIVE), generated offline from a
seed: every random number is drawn on the CPU from a private generator, so a seed gives
the same images on every device and the global random state is not touched. Shifted
variants for out-of-distribution tests come from the same generator with stronger
``noise_std`` or another ``vessel_contrast`` (negative: vessels brighter than the
background, unlike real fundus images).
"""

import math
from typing import NamedTuple, Union

import torch
from torch import Tensor


class VesselImages(NamedTuple):
    images: Tensor  #: (N, 1, size, size) float intensities, 0 outside the field of view
    vessels: Tensor  #: (N, 1, size, size) bool vessel pixels (the segmentation label)
    lesions: Tensor  #: (N, 1, size, size) bool lesion pixels
    labels: Tensor  #: (N,) long, 1 where the image has lesions


def synthetic_vessels(
    n_images: int,
    size: int = 64,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    noise_std: float = 0.03,
    vessel_contrast: float = 0.3,
    lesion_probability: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> VesselImages:
    r"""Generate fundus-like images with a branching vessel tree.

    Each image has a circular field of view with vignetting, a bright optic disc on the
    left or right, six main vessels that leave the disc as smooth random walks and
    thin out, one branch per main vessel, and Gaussian noise. With probability
    ``lesion_probability`` an image also gets 1 to 4 dark round lesions
    (haemorrhage-like) and label 1.

    Args:
        n_images (int): number of images N.
        size (int): side of the square images in pixels (>= 32). Default: 64
        seed (int): seed of the private generator. Default: 0
        device (str or torch.device): where the images are rendered. Default: "cpu"
        noise_std (float): standard deviation of the pixel noise. Default: 0.03
        vessel_contrast (float): how much darker vessels are than the background.
            Default: 0.3
        lesion_probability (float): chance that an image has lesions. Default: 0.0
        dtype (torch.dtype): floating-point dtype of ``images``. Default: float32

    Returns:
        VesselImages: images, vessel and lesion masks, labels.

    Examples::

        >>> data = synthetic_vessels(8, size=64, seed=0, lesion_probability=0.5)
        >>> data.images.shape, data.vessels.dtype
        (torch.Size([8, 1, 64, 64]), torch.bool)
    """
    if not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be an int >= 1, got {n_images!r}")
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an int >= 32, got {size!r}")
    if not 0.0 <= lesion_probability <= 1.0:
        raise ValueError(f"lesion_probability must be in [0, 1], got {lesion_probability!r}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    generator = torch.Generator().manual_seed(seed)
    images, vessels, lesions, labels = [], [], [], []
    for _ in range(n_images):
        image, vessel, lesion, label = _one_image(
            size, generator, noise_std, vessel_contrast, lesion_probability
        )
        images.append(image)
        vessels.append(vessel)
        lesions.append(lesion)
        labels.append(label)
    to_device = lambda tensors: torch.stack(tensors).unsqueeze(1).to(device)  # noqa: E731
    return VesselImages(
        to_device(images).to(dtype),
        to_device(vessels),
        to_device(lesions),
        torch.tensor(labels, dtype=torch.long, device=device),
    )


def _one_image(size, generator, noise_std, vessel_contrast, lesion_probability):
    """Render one image on the CPU."""
    uniform = lambda *shape: torch.rand(shape, generator=generator, dtype=torch.float32)  # noqa: E731
    coordinates = torch.arange(size, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(coordinates, coordinates, indexing="ij"), dim=-1).reshape(
        -1, 2
    )
    centre = (size - 1) / 2
    radius_to_centre = (grid - centre).norm(dim=1)
    field_of_view = radius_to_centre <= 0.46 * size

    side = 1.0 if float(uniform(1)) < 0.5 else -1.0
    disc = torch.tensor([centre, centre + side * 0.22 * size], dtype=torch.float32)
    disc = disc + (uniform(2) - 0.5) * 0.08 * size
    background = 0.5 + 0.15 * uniform(1) - 0.25 * (radius_to_centre / size) ** 2
    background = background + 0.3 * torch.exp(
        -((grid - disc).norm(dim=1) ** 2) / (2 * (0.05 * size) ** 2)
    )

    points, widths = _vessel_tree(disc, side, size, uniform, generator)
    distance = torch.cdist(grid, points)  # (pixels, points)
    # Gaussian cross-section of width ``widths``; exp is monotone, so the brightest
    # vessel at a pixel is the one with the smallest scaled distance.
    scaled_distance = (distance / (widths / 2)).amin(dim=1)
    profile = torch.exp(-(scaled_distance**2) / 2)
    # A label at least ~1.4 px wide, so thin vessels stay connected on the pixel grid.
    vessel = (distance <= (widths / 2).clamp_min(0.71)).any(dim=1) & field_of_view

    has_lesions = float(uniform(1)) < lesion_probability
    lesion = torch.zeros(size * size, dtype=torch.bool)
    lesion_profile = torch.zeros(size * size, dtype=torch.float32)
    if has_lesions:
        n_lesions = 1 + int(uniform(1) * 4)
        centres = centre + (uniform(n_lesions, 2) - 0.5) * 0.6 * size
        radii = (0.025 + 0.025 * uniform(n_lesions)) * size
        lesion_distance = torch.cdist(grid, centres)
        lesion = (lesion_distance <= radii).any(dim=1) & field_of_view
        lesion_profile = torch.sigmoid(3 * (radii - lesion_distance)).amax(dim=1)

    noise = noise_std * torch.randn(size * size, generator=generator, dtype=torch.float32)
    image = background - vessel_contrast * profile - 0.35 * lesion_profile + noise
    image = torch.where(field_of_view, image, 0.0)
    as_square = lambda values: values.reshape(size, size)  # noqa: E731
    return as_square(image), as_square(vessel), as_square(lesion), int(has_lesions)


def _vessel_tree(disc, side, size, uniform, generator, n_main=6):
    """Points (M, 2) along the vessels and the vessel width at each point."""
    scale = size / 64
    # Main vessels leave the disc towards the far side, spread over about 200 degrees.
    spread = torch.linspace(-1.75, 1.75, n_main, dtype=torch.float32) + 0.2 * (
        uniform(n_main) - 0.5
    )
    start_angles = -side * math.pi / 2 + spread
    main_points = _random_walks(disc.expand(n_main, 2), start_angles, int(0.75 * size), generator)
    main_widths = (
        (1.4 + 0.8 * uniform(n_main, 1)) * scale * torch.linspace(1.0, 0.4, main_points.shape[1])
    )

    # One branch per main vessel, leaving at a random point at 25-65 degrees.
    branch_at = (0.2 + 0.5 * uniform(n_main)) * (main_points.shape[1] - 1)
    rows = torch.arange(n_main)
    branch_index = branch_at.long()
    step = main_points[rows, branch_index + 1] - main_points[rows, branch_index]
    parent_angles = torch.atan2(step[:, 1], step[:, 0])
    turn = torch.where(uniform(n_main) < 0.5, -1.0, 1.0) * (0.45 + 0.7 * uniform(n_main))
    branch_points = _random_walks(
        main_points[rows, branch_index], parent_angles + turn, int(0.4 * size), generator
    )
    branch_widths = (
        0.7
        * main_widths[rows, branch_index].unsqueeze(1)
        * torch.linspace(1.0, 0.5, branch_points.shape[1])
    )

    points = torch.cat([main_points.reshape(-1, 2), branch_points.reshape(-1, 2)])
    widths = torch.cat([main_widths.reshape(-1), branch_widths.reshape(-1)])
    return points, widths


def _random_walks(starts, start_angles, n_steps, generator):
    """Smooth walks of unit steps: the heading drifts with a per-walk curvature plus noise."""
    n_walks = starts.shape[0]
    curvature = 0.03 * torch.randn(n_walks, 1, generator=generator, dtype=torch.float32)
    wiggle = 0.08 * torch.randn(n_walks, n_steps, generator=generator, dtype=torch.float32)
    headings = start_angles.unsqueeze(1) + torch.cumsum(curvature + wiggle, dim=1)
    steps = torch.stack([torch.cos(headings), torch.sin(headings)], dim=-1)
    return starts.unsqueeze(1) + torch.cumsum(steps, dim=1)
