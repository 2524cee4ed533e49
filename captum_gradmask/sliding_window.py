"""MC-dropout inference on volumes larger than memory, through MONAI's sliding windows."""

from typing import Optional, Sequence, Union

from torch import Tensor

from captum_gradmask.mc_dropout import MCDropout


def mc_sliding_window_inference(
    mc_model: MCDropout,
    inputs: Tensor,
    roi_size: Union[int, Sequence[int]],
    sw_batch_size: int = 1,
    mc_samples_batch_size: Optional[int] = None,
    **sliding_window_kwargs: object,
) -> Tensor:
    r"""Outputs (T, N, C, *spatial) of the T sub-networks on whole volumes, window by
    window, with MONAI's ``sliding_window_inference`` (an optional extra:
    ``pip install captum-gradmask[monai]``).

    Each window runs through all T sub-networks (the same masks for every window of
    one shape); the T outputs are folded into the channels so that MONAI stitches them
    as one C x T-channel output, then unfolded. Pass the result's softmax to
    :func:`~captum_gradmask.predictive_uncertainty`. Where the window covers the whole
    volume, the result equals ``mc_model(inputs)``.

    Args:
        mc_model (MCDropout): the sub-networks of a network with (N, C, *spatial) outputs.
        inputs (Tensor): volumes (N, C_in, *spatial).
        roi_size (int or sequence of int): the window size, as in MONAI.
        sw_batch_size (int): windows per forward pass, as in MONAI. Default: 1
        mc_samples_batch_size (int, optional): as in ``MCDropout.forward``.
        **sliding_window_kwargs: further arguments of MONAI's
            ``sliding_window_inference`` (``overlap``, ``mode``, ``sw_device``,
            ``device``, ...).

    Examples::

        >>> mc_unet = MCDropout(unet, n_samples=20)
        >>> logits = mc_sliding_window_inference(mc_unet, volume, roi_size=96, overlap=0.25)
        >>> maps = predictive_uncertainty(logits.softmax(dim=2))   # per voxel
    """
    try:
        from monai.inferers import sliding_window_inference
    except ImportError as error:
        raise ImportError(
            "mc_sliding_window_inference needs MONAI: pip install captum-gradmask[monai]"
        ) from error
    if not isinstance(mc_model, MCDropout):
        raise TypeError(f"mc_model must be an MCDropout, got {type(mc_model).__name__}")

    def all_sub_networks(windows: Tensor) -> Tensor:
        stacked = mc_model(windows, mc_samples_batch_size=mc_samples_batch_size)  # (T, n, C, ...)
        return stacked.transpose(0, 1).flatten(1, 2)  # (n, T * C, ...)

    folded = sliding_window_inference(
        inputs, roi_size, sw_batch_size, all_sub_networks, **sliding_window_kwargs
    )
    return folded.unflatten(1, (mc_model.n_samples, -1)).transpose(0, 1)
