"""Synthetic lesion images with a scanner-like artifact that confounds the label.

A benchmark for GradMask: a textured lesion decides the label, and an
artifact goes with the label in training (present with probability ``confound``
in class-1 images and ``1 - confound`` in class-0 images) but not at test
(``confound=0.5``: present in half the images of each class). A classifier that
learns the artifact instead of the lesion fails at test. Two artifact kinds:

- ``"spot"``: a smooth bright Gaussian spot in the top-left corner, added to
  the image (glare, an uneven coil or lamp). Models answer it smoothly, so input
  gradients show it.
- ``"marker"``: a square in the top-left corner set to a high constant value (a
  burned-in label). Models can answer it with a saturated, flat response, so
  input gradients on it vanish while the model still uses it.

Lesions never touch the artifact zone. Random numbers are drawn on the CPU from a
private generator, so a seed gives the same images on every device and the global
random state is not touched.
"""

from typing import NamedTuple, Union

import torch
from torch import Tensor

from ._common import artifact_draws, check_count

ARTIFACTS = ("spot", "marker")
SPOT_PEAK = 1.0  #: peak intensity added by the spot
SPOT_WIDTH = 0.08  #: standard deviation of the spot, as a fraction of the image side
MARKER_VALUE = 4.0  #: the marker's constant intensity
MARKER_SIDE = 0.15  #: marker side, as a fraction of the image side
ARTIFACT_CENTRE = 0.125  #: spot centre (row and column), as a fraction of the side
ARTIFACT_ZONE = 0.3  #: lesions stay right of this fraction of the image side


class LesionImages(NamedTuple):
    images: Tensor  #: (N, 1, size, size) float: noise, lesion (label 1), artifact
    labels: Tensor  #: (N,) long: 1 for images with a lesion (odd indices), else 0
    masks: Tensor  #: (N, 1, size, size) float, 1 on the lesion disc; all 0 if label 0
    has_artifact: Tensor  #: (N,) bool: the artifact is in the image


def confounded_lesions(
    n_images: int,
    artifact: str = "spot",
    confound: float = 0.9,
    size: int = 32,
    lesion_contrast: float = 1.5,
    lesion_radius: float = 3.0,
    noise_std: float = 0.5,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LesionImages:
    r"""Generate lesion images whose label is confounded by an artifact.

    Odd-indexed images have a lesion (label 1) at a random place right of the
    artifact zone: a Gaussian bump of peak ``lesion_contrast`` and standard
    deviation ``lesion_radius / 1.5``, modulated by a random texture. Its mask is
    the disc of ``lesion_radius`` pixels, where the bump exceeds a third of its
    peak (about 2/3 of the lesion's intensity; a 2-pixel dilation covers 95%).
    Every image gets Gaussian pixel noise. The artifact is then drawn into the
    image with probability ``confound`` if the label is 1 and ``1 - confound`` if
    it is 0.

    Args:
        n_images (int): number of images N.
        artifact (str): "spot" (smooth, gradient-visible) or "marker" (binary,
            high-intensity, answered with a saturated response). Default: "spot"
        confound (float): probability of the artifact in class-1 images; class-0
            images have it with probability ``1 - confound``. 0.5 makes it
            independent of the label (a test set), 1.0 a perfect shortcut.
            Default: 0.9
        size (int): side of the square images in pixels (>= 16). Default: 32
        lesion_contrast (float): peak intensity of the lesion. Default: 1.5
        lesion_radius (float): lesion radius in pixels; the mask is this disc.
            Default: 3.0
        noise_std (float): standard deviation of the pixel noise. Default: 0.5
        seed (int): seed of the private generator. Default: 0
        device (str or torch.device): where the tensors are returned. Default: "cpu"
        dtype (torch.dtype): floating-point dtype of ``images`` and ``masks``.
            Default: float32

    Returns:
        LesionImages: images, labels, lesion masks (GradMask's ``mask``) and
        whether each image has the artifact.

    Examples::

        >>> train = confounded_lesions(256, artifact="marker", confound=0.9, seed=1)
        >>> test = confounded_lesions(256, artifact="marker", confound=0.5, seed=2)
        >>> train.images.shape, train.masks.shape, train.labels.shape
        (torch.Size([256, 1, 32, 32]), torch.Size([256, 1, 32, 32]), torch.Size([256]))
    """
    _check_arguments(n_images, artifact, confound, size, lesion_contrast, lesion_radius, noise_std)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_images) % 2
    lesions, masks = _lesions(labels, size, lesion_contrast, lesion_radius, generator)
    noise = noise_std * torch.randn(n_images, 1, size, size, generator=generator, dtype=torch.float64)
    has_artifact = artifact_draws(labels, confound, generator)
    images = add_artifact(lesions + noise, has_artifact, artifact)
    return LesionImages(
        images=images.to(device=device, dtype=dtype),
        labels=labels.to(device),
        masks=masks.to(device=device, dtype=dtype),
        has_artifact=has_artifact.to(device),
    )


def add_artifact(images: Tensor, present: Tensor, artifact: str) -> Tensor:
    r"""Return ``images`` with the artifact drawn into those where ``present``.

    Args:
        images (Tensor): float images (N, C, H, W).
        present (Tensor): bool (N,): which images get the artifact.
        artifact (str): "spot" adds a Gaussian spot of peak ``SPOT_PEAK`` near the
            top-left corner; "marker" sets a square of side ``MARKER_SIDE * W`` in
            the top-left corner to ``MARKER_VALUE``.

    Returns:
        Tensor: a new tensor like ``images``.

    Examples::

        >>> marked = add_artifact(torch.zeros(2, 1, 32, 32), torch.tensor([True, False]), "marker")
        >>> marked[:, 0, 0, 0]
        tensor([4., 0.])
    """
    if artifact not in ARTIFACTS:
        raise ValueError(f"artifact must be one of {ARTIFACTS}, got {artifact!r}")
    present = present.view(-1, 1, 1, 1).to(images.device)
    width = images.shape[-1]
    if artifact == "spot":
        grid = torch.arange(width, device=images.device, dtype=images.dtype)
        squared_distance = (grid.view(-1, 1) - ARTIFACT_CENTRE * width) ** 2 + (
            grid.view(1, -1) - ARTIFACT_CENTRE * width
        ) ** 2
        spot = SPOT_PEAK * torch.exp(-squared_distance / (2 * (SPOT_WIDTH * width) ** 2))
        return images + present * spot
    side = round(MARKER_SIDE * width)
    marked = images.clone()
    corner = marked[..., :side, :side]
    corner.copy_(torch.where(present, MARKER_VALUE, corner))
    return marked


def _lesions(labels, size, contrast, radius, generator):
    """Textured lesion intensities (N, 1, size, size) and their disc masks, float64."""
    n_images = len(labels)
    low = (ARTIFACT_ZONE * size + radius, radius + 1)  # column, row
    high = size - radius - 1
    uniform = torch.rand(n_images, 2, generator=generator, dtype=torch.float64)
    column = low[0] + uniform[:, 0] * (high - low[0])
    row = low[1] + uniform[:, 1] * (high - low[1])
    grid = torch.arange(size, dtype=torch.float64)
    squared_distance = (grid.view(1, -1, 1) - row.view(-1, 1, 1)) ** 2 + (
        grid.view(1, 1, -1) - column.view(-1, 1, 1)
    ) ** 2  # (N, size, size)
    bump = torch.exp(-squared_distance / (2 * (radius / 1.5) ** 2))
    texture = 1 + 0.5 * torch.randn(n_images, size, size, generator=generator, dtype=torch.float64)
    present = (labels == 1).view(-1, 1, 1)
    lesions = contrast * bump * texture * present
    masks = ((squared_distance <= radius**2) & present).to(torch.float64)
    return lesions.unsqueeze(1), masks.unsqueeze(1)


def _check_arguments(n_images, artifact, confound, size, lesion_contrast, lesion_radius, noise_std):
    check_count("n_images", n_images)
    if artifact not in ARTIFACTS:
        raise ValueError(f"artifact must be one of {ARTIFACTS}, got {artifact!r}")
    if not 0.0 <= confound <= 1.0:
        raise ValueError(f"confound must be in [0, 1], got {confound!r}")
    check_count("size", size, minimum=16)
    if not lesion_contrast >= 0:
        raise ValueError(f"lesion_contrast must be >= 0, got {lesion_contrast!r}")
    if not 0 < lesion_radius <= size / 8:
        raise ValueError(f"lesion_radius must be in (0, size / 8], got {lesion_radius!r}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
