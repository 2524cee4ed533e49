"""MC-dropout inference on volumes larger than memory, through MONAI's sliding windows."""

from typing import Optional, Sequence, Union

from torch import Tensor

from captum_gradmask._validation import is_int, warn_at_caller
from captum_gradmask.mc_dropout import MCDropout


def mc_sliding_window_inference(
    mc_model: MCDropout,
    inputs: Tensor,
    roi_size: Union[int, Sequence[int]],
    sw_batch_size: int = 1,
    overlap: float = 0.0,
    mc_samples_batch_size: Optional[int] = None,
    **sliding_window_kwargs: object,
) -> Tensor:
    r"""Outputs (T, N, C, *spatial) of the T sub-networks on volumes too large for one
    pass, window by window, with MONAI's ``sliding_window_inference`` (an optional
    extra: ``pip install captum-gradmask[monai]``).

    Each window runs through all T sub-networks; the T outputs are folded into the
    channels so that MONAI stitches them as one C x T-channel output (which grows with
    T), then unfolded. Pass the result's softmax to
    :func:`~captum_gradmask.predictive_uncertainty`. With a window of the volume's
    size the result equals ``mc_model(inputs)``.

    A sub-network's masks are drawn per window shape: channel-wise dropout and
    stochastic depth are the same in every window, but element-wise ``nn.Dropout``
    masks repeat window by window, so where windows overlap, their blend mixes
    different masks and lowers the spread over T (tests/test_mc_dropout_monai.py
    measures it on a 3-D UNet). Hence ``overlap=0`` by default, and a warning for
    element-wise dropout with overlap.

    Args:
        mc_model (MCDropout): the sub-networks of a network with (N, C, *spatial) outputs.
        inputs (Tensor): volumes (N, C_in, *spatial).
        roi_size (int or sequence of int): the window size, as in MONAI (>= 1).
        sw_batch_size (int): windows per forward pass, as in MONAI. Default: 1
        overlap (float): overlap of neighbouring windows, as in MONAI. Default: 0.0
        mc_samples_batch_size (int, optional): as in ``MCDropout.forward``.
        **sliding_window_kwargs: further arguments of MONAI's
            ``sliding_window_inference`` (``mode``, ``sw_device``, ``device``, ...).

    Examples::

        >>> mc_unet = MCDropout(unet, n_samples=20)
        >>> logits = mc_sliding_window_inference(mc_unet, volume, roi_size=96)
        >>> maps = predictive_uncertainty(logits.softmax(dim=2))   # per voxel
    """
    try:
        from monai.inferers import sliding_window_inference
    except ImportError as error:
        raise ImportError(
            "mc_sliding_window_inference needs MONAI: pip install captum-gradmask[monai]"
        ) from error
    _check_arguments(mc_model, roi_size, sw_batch_size, overlap)

    def all_sub_networks(windows: Tensor) -> Tensor:
        stacked = mc_model(windows, mc_samples_batch_size=mc_samples_batch_size)  # (T, n, C, ...)
        return stacked.transpose(0, 1).flatten(1, 2)  # (n, T * C, ...)

    folded = sliding_window_inference(
        inputs, roi_size, sw_batch_size, all_sub_networks, overlap=overlap, **sliding_window_kwargs
    )
    return folded.unflatten(1, (mc_model.n_samples, -1)).transpose(0, 1)


def _check_arguments(mc_model: object, roi_size: object, sw_batch_size: object, overlap: object) -> None:
    if not isinstance(mc_model, MCDropout):
        raise TypeError(f"mc_model must be an MCDropout, got {type(mc_model).__name__}")
    sizes = roi_size if isinstance(roi_size, (tuple, list)) else (roi_size,)
    if not sizes or not all(is_int(size) and size >= 1 for size in sizes):
        raise ValueError(f"roi_size must be an int >= 1 or a sequence of them, got {roi_size!r}")
    if not is_int(sw_batch_size) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be an int >= 1, got {sw_batch_size!r}")
    if not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise ValueError(f"overlap must be a number in [0, 1), got {overlap!r}")
    element_wise = [layer.name for layer in mc_model.stochastic_layers if layer.mask_kind == "element"]
    if overlap > 0 and element_wise:
        warn_at_caller(
            f"overlap={overlap} with element-wise dropout ({element_wise[0]!r}"
            f"{' and others' if len(element_wise) > 1 else ''}): its masks repeat window "
            "by window, so blending overlapping windows lowers the spread over the "
            "sub-networks (the uncertainty); use overlap=0"
        )
