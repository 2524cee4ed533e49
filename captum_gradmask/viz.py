"""Figures of attributions, uncertainty and masks over images (the ``viz`` extra).

Images are (C, H, W) or volumes (C, D, H, W); volumes are shown by one slice along
their last axis, the middle one unless ``slice_index`` says otherwise, or by a
``montage`` of several slices. Maps shown side by side share one colour scale, so that
their values compare; signed maps use a diverging scale centred on 0.

Examples::

    >>> from captum_gradmask import viz
    >>> figure = viz.map_grid(
    ...     images, {"Saliency": saliency, "ContrastSaliency": contrast}, masks=lesions,
    ...     signed=True)
    >>> figure.savefig("outputs/maps.png")
"""

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from captum_gradmask.datasets._common import import_optional

MASK_COLOURS = ("lime", "orange", "cyan", "magenta")


def plane(tensor: Tensor, slice_index: Optional[int] = None) -> np.ndarray:
    """The 2-D array shown for an image (C, H, W) or volume (C, D, H, W): channels
    averaged, volumes cut at ``slice_index`` along the last axis (default: middle)."""
    array = tensor.detach().float().cpu()
    if array.dim() not in (3, 4):
        raise ValueError(
            f"expected an image (C, H, W) or a volume (C, D, H, W), got shape {tuple(tensor.shape)}"
        )
    array = array.mean(0)
    if array.dim() == 3:
        index = array.shape[-1] // 2 if slice_index is None else slice_index
        array = array[..., index]
    return array.numpy()


def shared_scale(maps: Sequence[Tensor], signed: bool) -> Tuple[float, float]:
    """(vmin, vmax) covering every map (NaN, drawn transparent, ignored): symmetric
    about 0 if ``signed``."""
    values = [m.detach()[~m.detach().isnan()] for m in maps]
    largest = max((float(v.abs().max()) for v in values if v.numel()), default=0.0) or 1.0
    if signed:
        return -largest, largest
    return min(float(v.min()) for v in values if v.numel()), largest


def show(axis, image=None, overlay=None, masks=(), *, scale=None, signed=False, slice_index=None, title=None,
         cmap=None):
    """Draw ``image`` in grey, ``overlay`` (a map; NaN is transparent) over it on
    ``scale`` with ``cmap`` (default: diverging if ``signed``, else magma), and
    ``masks`` (each (1, ...) bool or 0/1) as contours; return the overlay's artist
    (for a colour bar) or the image's."""
    artist = None
    if image is not None:
        artist = axis.imshow(plane(image, slice_index), cmap="gray")
    if overlay is not None:
        vmin, vmax = scale if scale is not None else shared_scale([overlay], signed)
        artist = axis.imshow(
            plane(overlay, slice_index), cmap=cmap or ("RdBu_r" if signed else "magma"), vmin=vmin, vmax=vmax,
            alpha=0.75 if image is not None else 1.0,
        )
    for mask, colour in zip(masks, MASK_COLOURS):
        contour = plane(mask.float(), slice_index)
        if contour.max() > contour.min():
            axis.contour(contour, levels=[0.5], colors=colour, linewidths=0.8)
    axis.set_axis_off()
    if title:
        axis.set_title(title, fontsize=8, loc="left")
    return artist


def map_grid(
    images: Tensor,
    maps: Dict[str, Tensor],
    masks: Optional[Tensor] = None,
    *,
    n_columns: int = 4,
    signed: bool = False,
    slice_index: Optional[int] = None,
    colour_bar_label: str = "",
    column_titles: Optional[Sequence[str]] = None,
):
    """A figure: the first ``n_columns`` images in the top row, then one row per map
    (N, C, *spatial), each row on one colour scale with its colour bar; ``masks``
    (N, K, *spatial) contoured on every panel. Returns the matplotlib Figure."""
    plt = import_optional("matplotlib.pyplot")
    shown = min(n_columns, len(images))
    figure, axes = plt.subplots(
        len(maps) + 1, shown, figsize=(2.3 * shown + 1.0, 2.3 * (len(maps) + 1)), squeeze=False,
        layout="constrained",
    )
    mask_list = [] if masks is None else [[m[k : k + 1] for k in range(m.shape[0])] for m in masks]
    for column in range(shown):
        panel_masks = mask_list[column] if mask_list else ()
        top_title = column_titles[column] if column_titles else ("image" if column == 0 else None)
        show(axes[0, column], images[column], masks=panel_masks, slice_index=slice_index, title=top_title)
        for row, (name, values) in enumerate(maps.items(), start=1):
            scale = shared_scale([values[:shown]], signed)
            artist = show(axes[row, column], overlay=values[column], masks=panel_masks, scale=scale,
                          signed=signed, slice_index=slice_index, title=name if column == 0 else None)
            if column == shown - 1:
                figure.colorbar(artist, ax=axes[row, :].tolist(), shrink=0.85, label=colour_bar_label)
    return figure


def montage(
    volume: Tensor,
    maps: Dict[str, Tensor],
    masks: Optional[Tensor] = None,
    *,
    slice_indices: Optional[Sequence[int]] = None,
    n_slices: int = 5,
    signed: bool = False,
    colour_bar_label: str = "",
):
    """A figure of one volume (C, D, H, W) cut along its last axis at ``slice_indices``
    (default: ``n_slices`` evenly spaced inside the volume): the volume in the top row,
    then one row per map (C', D, H, W) on one colour scale, ``masks`` (K, D, H, W)
    contoured. Returns the matplotlib Figure.

    Example::

        >>> figure = viz.montage(volume, {"|saliency|": saliency[0].abs()}, masks=lesion,
        ...                      slice_indices=[10, 12, 14])
    """
    if volume.dim() != 4:
        raise ValueError(f"volume: expected (C, D, H, W), got shape {tuple(volume.shape)}")
    depth = volume.shape[-1]
    if slice_indices is None:
        slice_indices = np.linspace(0, depth - 1, n_slices + 2)[1:-1].round().astype(int).tolist()
    if not all(0 <= index < depth for index in slice_indices):
        raise ValueError(f"slice_indices: expected indices in [0, {depth}), got {list(slice_indices)}")

    def cut(tensor: Tensor) -> Tensor:
        return torch.stack([tensor[..., index] for index in slice_indices])

    return map_grid(
        cut(volume), {name: cut(values) for name, values in maps.items()},
        None if masks is None else cut(masks), n_columns=len(slice_indices), signed=signed,
        colour_bar_label=colour_bar_label, column_titles=[f"slice {index}" for index in slice_indices],
    )
