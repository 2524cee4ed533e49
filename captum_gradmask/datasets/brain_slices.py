"""Brain slices: real MNI152 anatomy with inserted lesions and a scanner confound.

The small-sample medical setting of GradMask (Simpson et al., MIDL 2019) on data
that needs no download: axial slices of the MNI152 T1 template and brain mask that
ship with nilearn (2 mm, 99 x 117 x 95 voxels), resampled to ``size`` x ``size``.
Half of the images get a lesion (label 1): a bright blob in brain tissue whose
disc is the mask. A scanner-like artifact goes with the label in training
(present with probability ``confound`` in lesion images and ``1 - confound`` in
the others) and not at test (``confound=0.5``). Two artifacts:

- ``"bias_field"``: a smooth multiplicative intensity ramp, darker on the left and
  brighter on the right, as from a receive coil's uneven sensitivity. It changes
  the whole brain, lesion included, by at most ``BIAS_STRENGTH``.
- ``"zipper"``: a one-pixel column of alternating bright and dark dots across the
  whole image, as from radio-frequency interference.

Each image is one of the central axial slices (the band where the brain covers at
least ``MIN_BRAIN_AREA`` of the largest slice's area) with a random gain (scanner
to scanner intensity scale) and Gaussian noise. All slices come from one template
brain, so train and test share anatomy; what differs between images is the slice,
the gain, the noise, the lesion and the artifact. Random numbers are drawn on the
CPU from a private generator, so a seed gives the same images on every device and
the global random state is not touched.

How strong the confound is (measured, 128 training images, one seed, 400 test
images): a small CNN with global max pooling reaches test AUC 0.92 trained without
the confound and 0.69 trained with it (``confound=0.9``, bias field); with
``lesion_contrast=0.8`` the lesion is easy enough that the confound no longer
hurts (0.999). A CNN ending in a dense layer over the whole image learns the
artifact alone (test AUC about 0.5 at 64 and 128 images, with either artifact).

Which artifact a saliency penalty can remove: the zipper lies outside every
lesion, so a GradMask penalty on everything but the lesion sees all of it; the
bias field also scales the lesion, where the penalty does not look. Measured with
the protocol of ``examples/reproduce_table.py`` (the CNN with max pooling, 150
steps, 20 seeds): with the zipper the baseline's test AUC is 0.52 at 64 and at
128 images (it reads the zipper alone) and GradMask ``contrast`` sq_l2 reaches
0.72 and 0.71 (Wilcoxon p = 1.9e-06); with the bias field (12 seeds) the
baseline is at 0.62 and 0.68 and GradMask moves it by +0.02 and -0.05.
"""

from functools import lru_cache
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    artifact_draws,
    check_count,
    import_optional,
    resize,
    resolve_confound,
    split_generator,
)

ARTIFACTS = ("bias_field", "zipper")
BIAS_STRENGTH = 0.25  #: the bias field scales intensities from 1 - s (left) to 1 + s (right)
ZIPPER_AMPLITUDE = 0.3  #: zipper dots are +- this, added to the image
ZIPPER_COLUMN = 0.8  #: zipper position, as a fraction of the image width
MIN_BRAIN_AREA = 0.6  #: slices kept: brain area at least this fraction of the largest
GAIN_RANGE = (0.9, 1.1)  #: random intensity scale per image
LESION_RADIUS = (2.0, 4.0)  #: lesion radius range in pixels at size 64 (scaled with size)
TISSUE_THRESHOLD = 0.4  #: lesion centres lie in tissue brighter than this (not CSF)


class BrainSlices(NamedTuple):
    images: Tensor  #: (N, 1, size, size) float: slice * gain, lesion, artifact, noise
    labels: Tensor  #: (N,) long: 1 for images with a lesion (odd indices), else 0
    masks: Tensor  #: (N, 1, size, size) float: 1 on the lesion disc; all 0 if label 0
    has_artifact: Tensor  #: (N,) bool: the artifact is in the image


def brain_slices(
    n_samples: int,
    split: str = "train",
    artifact: str = "bias_field",
    confound: Optional[float] = None,
    size: int = 64,
    lesion_contrast: float = 0.4,
    noise_std: float = 0.05,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> BrainSlices:
    r"""Generate MNI152 axial slices with lesions and a label-confounding artifact.

    Args:
        n_samples (int): number of images N.
        split (str): "train", "valid" or "test"; sets the default of ``confound``
            and gives each split its own random stream. Default: "train"
        artifact (str): "bias_field" (smooth multiplicative ramp) or "zipper"
            (a dotted bright / dark column). Default: "bias_field"
        confound (float, optional): probability of the artifact in lesion images;
            other images have it with probability ``1 - confound``. Default: 0.9
            for "train", 0.5 (independent of the label) for "valid" and "test".
        size (int): side of the square images in pixels (>= 32). Default: 64
        lesion_contrast (float): peak intensity added by a lesion (tissue is
            about 0.5 to 0.9); negative for dark lesions. Default: 0.4
        noise_std (float): standard deviation of the pixel noise. Default: 0.05
        seed (int): seed of the private generator. Default: 0
        device (str or torch.device): where the tensors are returned. Default: "cpu"
        dtype (torch.dtype): floating-point dtype of ``images`` and ``masks``.
            Default: float32

    Returns:
        BrainSlices: images, labels, lesion masks (GradMask's ``mask``) and
        whether each image has the artifact.

    Raises:
        ImportError: if nilearn is not installed.

    Examples::

        >>> train = brain_slices(64, "train", seed=0)
        >>> test = brain_slices(256, "test", seed=0)
        >>> train.images.shape, train.masks.shape
        (torch.Size([64, 1, 64, 64]), torch.Size([64, 1, 64, 64]))
    """
    _check_arguments(n_samples, artifact, size, noise_std)
    confound = resolve_confound(confound, split, train=0.9, held_out=0.5)
    slices, brains, lesion_sites = _template_slices(size)
    generator = split_generator(seed, split)
    labels = torch.arange(n_samples) % 2
    chosen = torch.randint(len(slices), (n_samples,), generator=generator)
    low, high = GAIN_RANGE
    uniform = torch.rand(n_samples, 1, 1, 1, generator=generator, dtype=torch.float64)
    gains = low + (high - low) * uniform
    lesions, masks = _lesions(labels, lesion_sites[chosen], lesion_contrast, generator)
    anatomy = (slices[chosen] * gains + lesions) * brains[chosen]
    has_artifact = artifact_draws(labels, confound, generator)
    noise = noise_std * torch.randn(anatomy.shape, generator=generator, dtype=torch.float64)
    images = add_scanner_artifact(anatomy, has_artifact, artifact) + noise
    return BrainSlices(
        images=images.to(device=device, dtype=dtype),
        labels=labels.to(device),
        masks=masks.to(device=device, dtype=dtype),
        has_artifact=has_artifact.to(device),
    )


def add_scanner_artifact(images: Tensor, present: Tensor, artifact: str) -> Tensor:
    r"""Return ``images`` with the scanner artifact in those where ``present``.

    Args:
        images (Tensor): float images (N, C, H, W).
        present (Tensor): bool (N,): which images get the artifact.
        artifact (str): "bias_field" multiplies each column by a factor rising
            linearly from ``1 - BIAS_STRENGTH`` (left) to ``1 + BIAS_STRENGTH``
            (right); "zipper" adds ``+- ZIPPER_AMPLITUDE``, alternating row by
            row, to the column at ``ZIPPER_COLUMN`` of the width.

    Returns:
        Tensor: a new tensor like ``images``.

    Examples::

        >>> present = torch.tensor([True, False])
        >>> shifted = add_scanner_artifact(torch.ones(2, 1, 4, 5), present, "bias_field")
        >>> shifted[:, 0, 0]
        tensor([[0.7500, 0.8750, 1.0000, 1.1250, 1.2500],
                [1.0000, 1.0000, 1.0000, 1.0000, 1.0000]])
    """
    if artifact not in ARTIFACTS:
        raise ValueError(f"artifact must be one of {ARTIFACTS}, got {artifact!r}")
    present = present.view(-1, 1, 1, 1).to(images.device)
    height, width = images.shape[-2:]
    if artifact == "bias_field":
        ramp = torch.linspace(-1, 1, width, device=images.device, dtype=images.dtype)
        return images * torch.where(present, 1 + BIAS_STRENGTH * ramp, 1.0)
    dots = torch.zeros(height, width, device=images.device, dtype=images.dtype)
    signs = 1 - 2 * (torch.arange(height, device=images.device) % 2)
    dots[:, round(ZIPPER_COLUMN * (width - 1))] = ZIPPER_AMPLITUDE * signs
    return images + present * dots


@lru_cache(maxsize=None)
def _template_slices(size: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The central axial slices of MNI152, resampled to ``size``: all (S, 1, size, size).

    Returns intensities in [0, 1] (float64, 0 outside the brain), brain masks
    (float64 0 / 1) and where a lesion centre may lie (bool: tissue far enough
    inside the brain for the largest lesion).
    """
    nilearn_datasets = import_optional("nilearn.datasets")
    volume = torch.as_tensor(nilearn_datasets.load_mni152_template(resolution=2).get_fdata())
    brain = torch.as_tensor(nilearn_datasets.load_mni152_brain_mask(resolution=2).get_fdata())
    area = brain.sum(dim=(0, 1))
    central = area >= MIN_BRAIN_AREA * area.max()
    # (x, y, z) -> axial slices (z, 1, y, x), anterior at the top
    slices = _square(volume[:, :, central].permute(2, 1, 0).flip(1).unsqueeze(1), size)
    brains = _square(brain[:, :, central].permute(2, 1, 0).flip(1).unsqueeze(1), size)
    brains = (brains > 0.5).double()
    slices = slices.clamp(0, 1) * brains
    margin = round(LESION_RADIUS[1] * size / 64) + 1
    outside = F.max_pool2d(1 - brains, kernel_size=2 * margin + 1, stride=1, padding=margin)
    lesion_sites = (outside == 0) & (slices > TISSUE_THRESHOLD)
    return slices, brains, lesion_sites


def _square(slices: Tensor, size: int) -> Tensor:
    """Zero-pad (S, 1, H, W) slices to a centred square and resize to ``size``."""
    height, width = slices.shape[-2:]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    padded = F.pad(slices, (left, side - width - left, top, side - height - top))
    return resize(padded, size)


def _lesions(labels: Tensor, sites: Tensor, contrast: float, generator: torch.Generator):
    """Lesion intensities (N, 1, size, size) and their disc masks, float64; 0 if label 0.

    Each centre is drawn uniformly among the image's allowed ``sites``; the radius
    uniformly in ``LESION_RADIUS`` (scaled to the size); the intensity is a
    Gaussian bump of peak ``contrast`` and standard deviation radius / 1.5.
    """
    n_images, size = len(labels), sites.shape[-1]
    scores = torch.rand(n_images, size * size, generator=generator) * sites.flatten(1)
    centre = scores.argmax(dim=1)
    row, column = (centre // size).double(), (centre % size).double()
    low, high = (bound * size / 64 for bound in LESION_RADIUS)
    radius = low + (high - low) * torch.rand(n_images, generator=generator, dtype=torch.float64)
    grid = torch.arange(size, dtype=torch.float64)
    squared_distance = (grid.view(1, -1, 1) - row.view(-1, 1, 1)) ** 2 + (
        grid.view(1, 1, -1) - column.view(-1, 1, 1)
    ) ** 2
    present = (labels == 1).view(-1, 1, 1)
    bump = contrast * torch.exp(-squared_distance / (2 * (radius.view(-1, 1, 1) / 1.5) ** 2))
    masks = (squared_distance <= radius.view(-1, 1, 1) ** 2) & present
    return (bump * present).unsqueeze(1), masks.unsqueeze(1).double()


def _check_arguments(n_samples, artifact, size, noise_std):
    check_count("n_samples", n_samples)
    if artifact not in ARTIFACTS:
        raise ValueError(f"artifact must be one of {ARTIFACTS}, got {artifact!r}")
    check_count("size", size, minimum=32)
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
