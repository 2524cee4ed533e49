"""Layer-level saliency of the GradMask penalty: a map at one layer of the model,
upsampled to the input, so that the double backward stops at that layer.

With A the layer's output (N, K, *spatial) and G = d(sum_b s_b)/dA:

- "layer_gradient_x_activation": map = sum_k G_k * A_k, each location's first-order
  contribution to s_b (the channel sum of Captum's LayerGradientXActivation).
- "layer_grad_cam": map = sum_k mean_spatial(G_k) * A_k (Grad-CAM, Selvaraju et al.
  2017: Captum's LayerGradCam with its default relu_attributions=False).

Neither takes a ReLU: a feature that lowers the score is used all the same, and under
a ReLU the penalty has no gradient wherever the map is negative. The map is upsampled
to the input's size by linear interpolation (bilinear in 2-D, trilinear in 3-D,
align_corners=False, as Captum's LayerAttribution.interpolate in those modes) and
penalised outside the (dilated) lesion; a lesion in any input channel counts.
"""

import contextlib
from typing import Callable, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_gradmask._validation import values_checked, warn_at_caller

LAYER_SALIENCIES = ("layer_gradient_x_activation", "layer_grad_cam")
INTERPOLATION_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def check_layer_in_model(layer: nn.Module, forward_func: object) -> None:
    """When the forward function is a module, ``layer`` must be one of its modules."""
    if isinstance(forward_func, nn.Module) and not any(m is layer for m in forward_func.modules()):
        raise ValueError(
            f"layer {type(layer).__name__} is not a module of the model; pass one of "
            "its modules, e.g. model.features[-1]"
        )


class LayerTap:
    """A forward hook on ``layer``: records each output and, inside
    ``substituting(tensor)``, returns ``tensor`` in the output's place. It returns a
    copy either way, so in-place operations after the layer (ReLU(inplace=True))
    leave the recorded output intact."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.outputs: List[object] = []
        self._substitute: Optional[Tensor] = None

    def hook(self, module: nn.Module, args: object, output: object) -> Optional[Tensor]:
        if isinstance(output, Tensor) and self._substitute is None and not output.requires_grad:
            output = output.detach().requires_grad_()  # nothing below the layer trains
        self.outputs.append(output)
        if not isinstance(output, Tensor):  # refused by activation(), after the pass
            return None
        return (output if self._substitute is None else self._substitute).clone()

    @contextlib.contextmanager
    def substituting(self, tensor: Tensor) -> Iterator[None]:
        self._substitute = tensor
        try:
            yield
        finally:
            self._substitute = None

    def activation(self, inputs: Tensor) -> Tensor:
        """The output of the one pass recorded so far, checked to be a map
        (N, K, *spatial) with the inputs' batch size and number of spatial dims."""
        name = type(self.layer).__name__
        if not self.outputs:
            raise ValueError(
                f"layer {name} did not run in the forward pass; pass a module that the "
                "model calls on the inputs"
            )
        if len(self.outputs) > 1:
            raise ValueError(
                f"layer {name} ran {len(self.outputs)} times in one forward pass; pass a "
                "module that runs once (its map would be ambiguous)"
            )
        (output,) = self.outputs
        expected = f"(N={inputs.shape[0]}, K, {', '.join(['*'] * (inputs.dim() - 2))})"
        if not isinstance(output, Tensor):
            raise TypeError(f"layer {name} must output a Tensor {expected}, got a {type(output).__name__}")
        if output.dim() != inputs.dim() or output.shape[0] != inputs.shape[0] or output.shape[2:].numel() == 1:
            raise ValueError(
                f"layer {name} must output a map {expected} with the inputs' "
                f"{inputs.dim() - 2} spatial dims, larger than one pixel, got shape "
                f"{tuple(output.shape)}; pick a convolutional layer (before global pooling)"
            )
        return output


def layer_map_function(saliency: str, activation: Tensor, input_size: torch.Size) -> Callable[[Tensor], Tensor]:
    """G = d(sum_b s_b)/dA -> the map (N, 1, *input_size) of ``saliency``."""
    spatial_dims = tuple(range(2, activation.dim()))
    mode = INTERPOLATION_MODES[len(spatial_dims)]

    def map_of(gradient: Tensor) -> Tensor:
        weights = gradient
        if saliency == "layer_grad_cam":
            weights = gradient.mean(spatial_dims, keepdim=True)
            _warn_if_channel_weights_vanish(weights, gradient)
        layer_map = (weights * activation).sum(1, keepdim=True)
        return F.interpolate(layer_map, size=tuple(input_size), mode=mode, align_corners=False)

    return map_of


def _warn_if_channel_weights_vanish(weights: Tensor, gradient: Tensor) -> None:
    """Grad-CAM's weights are the spatial means of dS/dA. A BatchNorm in training mode
    right after the layer makes its input gradient average to 0 per channel over the
    batch and space: at batch size 1 every weight is 0 and the penalty with it."""
    if not values_checked():
        return
    largest_gradient = gradient.detach().abs().amax()
    if bool(largest_gradient > 0) and bool(weights.detach().abs().amax() <= 1e-6 * largest_gradient):
        warn_at_caller(
            "saliency='layer_grad_cam': the channel weights (spatial means of dS/dA) "
            "vanish, and the penalty with them; a BatchNorm in training mode right after "
            "the layer does this at batch size 1. Pick the layer after the BatchNorm, or "
            "saliency='layer_gradient_x_activation'"
        )
