"""Monte-Carlo dropout: T fixed-mask sub-networks of one model.

Gal & Ghahramani (2016) read dropout at test time as sampling T sub-networks from an
approximate posterior; Seo (2019) shows the resulting uncertainty maps beside saliency
maps for medical images. Here sub-network t applies one dropout mask to every example
of a batch, so each f_t is an ordinary deterministic function: attribution axioms such
as Integrated Gradients' completeness hold for each f_t, and results do not depend on
the batch size or on how the T samples are chunked. ``MCAttribution``
(mc_attribution.py) attributes them; uncertainty.py holds the entropy maths.
"""

import contextlib
import functools
import os
import sys
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_gradmask._batching import repeat_examples
from captum_gradmask._compat import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
)
from captum_gradmask._state import forward_hooks, no_global_random_draws, preserved_training_modes
from captum_gradmask._validation import (
    check_batch_size,
    check_finite_results,
    check_float_inputs,
    is_int,
)
from captum_gradmask.uncertainty import Uncertainty, UncertaintyAccumulator

# Input dimensions (batch included) of the channel-wise layers; nn.Dropout masks every
# element and takes any shape.
_CHANNEL_WISE_INPUT_DIMS = {nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5}
_SUPPORTED_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_UNSUPPORTED_DROPOUT = (nn.AlphaDropout, nn.FeatureAlphaDropout) + _SUPPORTED_DROPOUT
_GLOBAL_DRAW_REFUSAL = (
    "the model drew from the global random generator during an MC-dropout pass (e.g. "
    "F.dropout(x, training=True), F.scaled_dot_product_attention(dropout_p > 0) or a "
    "random layer in forward); MCDropout fixes the masks of nn.Dropout, "
    "nn.Dropout1d/2d/3d and stochastic-depth (DropPath, StochasticDepth) layers only: "
    "turn the other randomness off"
)

_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")


class StochasticLayer(NamedTuple):
    """A layer MCDropout samples: in eval mode it returns its input, and sub-network t
    multiplies that by a fixed mask of kept (``keep_scale``) and dropped (0) values."""

    name: str
    module: nn.Module
    drop_probability: float
    keep_scale: float
    mask_kind: str  # "element" (nn.Dropout), "channel" (Dropout1d/2d/3d) or "sample"


class MCDropout(nn.Module):
    r"""T dropout sub-networks of ``model``, evaluated together.

    Sub-network t multiplies the output of every stochastic layer (in eval mode, its
    input) by a mask drawn once for t and shared by all examples: element-wise for
    ``nn.Dropout``, one value per channel for ``nn.Dropout1d/2d/3d``, one value per
    sub-network for stochastic depth (MONAI's or timm's ``DropPath``, torchvision's
    ``StochasticDepth``, the drop_connect of MONAI's EfficientNet). The masks are set
    by forward hooks, drawn on the inputs' device for the sub-networks of one pass
    only (so ``mc_samples_batch_size`` bounds their memory too), from one seed per
    (layer, sub-network) derived from ``seed``: the same ``seed`` gives the same
    sub-networks for any batch size and chunking on a device type (outputs equal up to
    the rounding of batch-size-dependent kernels), and the global random state is
    never used. The masks of the last pass are kept for a next pass of the same
    sub-networks (with all T in one pass, repeated calls on inputs of one shape draw
    them once). Layers with p = 0 are left alone. During a call the model is in eval
    mode (BatchNorm uses its running statistics and does not update them); modes are
    restored afterwards, also after an exception.

    A layer whose input folds other rows into the batch dimension (window attention:
    B x windows rows) gets one mask per folded row, provided the batch comes first
    (row b * k + w belongs to example b, as in MONAI's window partition).

    Refused: a model without a stochastic layer of p > 0, ``AlphaDropout``,
    ``FeatureAlphaDropout``, subclasses of the dropout layers,
    ``nn.MultiheadAttention`` with ``dropout > 0``, attention blocks that call
    ``F.scaled_dot_product_attention`` with dropout (MONAI's ``use_flash_attention``);
    each error says how to run the model instead. A model that draws from the global
    random generator during the forward pass raises a RuntimeError.
    ``F.dropout(x, training=self.training)`` cannot be detected: it is off in eval
    mode, so it does not take part in sampling. A layer called twice in one forward
    pass applies the same mask both times.

    MONAI: a DataLoader's MetaTensor batch gives MetaTensor outputs. The (T, N, ...)
    stack is not a batch along T: ``decollate_batch(outputs.transpose(0, 1))`` gives
    each example's (T, ...) outputs with its metadata, and
    ``decollate_batch(maps.mutual_information.unsqueeze(1))`` channel-first maps that
    ``SaveImage`` writes. ``mc_sliding_window_inference`` runs volumes larger than
    memory.

    Activation-checkpointed models (MONAI's CheckpointUNet) recompute their blocks
    during backward, after a call's masks are gone: a call whose outputs require grad
    on such a model runs its passes again in backward, inside their sampling blocks
    (one more forward), so its gradients are those of the sub-networks.

    Args:
        model (nn.Module): a network with at least one dropout layer.
        n_samples (int): number T of sub-networks. Default: 20
        seed (int): seed of the masks. Default: 0

    Examples::

        >>> mc_model = MCDropout(unet, n_samples=20, seed=0)
        >>> logits = mc_model(images)                      # (20, N, C, H, W)
        >>> maps = mc_model.uncertainty(images)            # per-pixel Uncertainty
        >>> maps.mutual_information.shape                  # (N, H, W)
    """

    def __init__(self, model: nn.Module, n_samples: int = 20, seed: int = 0) -> None:
        """Arguments: see the class docstring."""
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not is_int(n_samples) or n_samples < 1:
            raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
        if not is_int(seed):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.model = model
        self.n_samples = n_samples
        self.seed = seed
        self.stochastic_layers = find_stochastic_layers(model)
        # One seed per layer (Python ints, so drawn on the CPU whatever the device);
        # sub-network t of a layer draws from (layer seed, t), so a mask does not
        # depend on which other sub-networks share its pass.
        seeds = torch.randint(
            0, 2**62, (len(self.stochastic_layers),), generator=torch.Generator().manual_seed(seed)
        )
        self._layer_seeds = seeds.tolist()
        self._pass: Optional[_Pass] = None
        self._last_pass: Optional[_Pass] = None  # its masks serve a next pass of the same samples

    def forward(
        self,
        inputs,
        additional_forward_args: Optional[object] = None,
        mc_samples_batch_size: Optional[int] = None,
    ) -> Tensor:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): the model's float inputs, batch of N
                in dimension 0; a tuple is passed to the model as separate arguments.
            additional_forward_args (Any, optional): passed to the model after the
                inputs; per-example entries (see ``_batching.py``) are replicated with
                the inputs.
            mc_samples_batch_size (int, optional): how many of the T samples run in one
                pass, on a batch replicated that many times; bounds memory. Default:
                all T in one pass.

        Returns:
            Tensor: outputs of the T sub-networks stacked, shape (T, N, ...).
        """
        passes = (inputs, additional_forward_args, mc_samples_batch_size)
        stacked = torch.cat(list(self._outputs_by_pass(*passes)))
        if stacked.requires_grad and self._last_pass.checkpointed:  # every pass runs the same model
            # Its backward would recompute checkpointed blocks after the masks are gone.
            differentiable = [*_format_tensor_into_tuples(inputs), *self.model.parameters()]
            stacked = _RecomputedWithMasks.apply(self, passes, stacked.detach(), *differentiable)
        return stacked

    def _outputs_by_pass(self, inputs, additional_forward_args, mc_samples_batch_size) -> Iterator[Tensor]:
        """The outputs (t, N, ...) of each pass of ``mc_samples_batch_size`` sub-networks,
        each handed out inside its sampling block (a backward of a checkpointed model
        recomputes with the masks only there)."""
        inputs_tuple = check_float_inputs(inputs, forward_func=self.model)
        model_args = inputs_tuple + (_format_additional_forward_args(additional_forward_args) or ())
        batch_size = inputs_tuple[0].shape[0]
        for samples in self.sample_chunks(mc_samples_batch_size):
            with self.sampling(samples):
                rows = repeat_examples(model_args, len(samples), batch_size)
                row_samples = torch.arange(samples.start, samples.stop, device=inputs_tuple[0].device)
                output = self.run_rows(rows, row_samples.repeat_interleave(batch_size))
                check_finite_results((output,), "the model outputs")
                yield output.unflatten(0, (len(samples), batch_size))

    def uncertainty(
        self,
        inputs,
        activation: str = "softmax",
        mc_samples_batch_size: Optional[int] = None,
    ) -> Uncertainty:
        r"""Uncertainty of the model's prediction over the T sub-networks.

        Computed in log space (log-softmax / log-sigmoid, logsumexp over t, 0 log 0 =
        0), so it stays finite for saturated logits. Follows the grad mode: wrap it in
        ``torch.no_grad()`` when no gradient is needed.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): as in ``forward``.
            activation (str): ``"softmax"`` for class logits (N, C, *spatial), C >= 2,
                or ``"sigmoid"`` for independent binary logits of any shape.
                Default: "softmax"
            mc_samples_batch_size (int, optional): as in ``forward``.

        Returns:
            Uncertainty: see its docstring for the shapes.
        """
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        accumulator = None
        for logits in self._outputs_by_pass(inputs, None, mc_samples_batch_size):
            log_probs, class_dim = _log_probabilities(logits, activation)
            accumulator = accumulator or UncertaintyAccumulator(class_dim)
            accumulator.add(log_probs)
        result = accumulator.result()
        return result._replace(mean=result.mean[..., 1]) if activation == "sigmoid" else result

    def sample_chunks(self, mc_samples_batch_size: Optional[int]) -> List[range]:
        """The sub-networks 0..T-1 in passes of ``mc_samples_batch_size`` (all T for None)."""
        size = check_batch_size(mc_samples_batch_size, "mc_samples_batch_size", self.n_samples)
        return [range(start, min(start + size, self.n_samples)) for start in range(0, self.n_samples, size)]

    @contextlib.contextmanager
    def sampling(self, samples: range) -> Iterator[None]:
        """Within the block the model is in eval mode and ``run_rows`` runs rows through
        the sub-networks ``samples``; their masks are drawn at first use and kept until
        the block ends (for every pass and backward of the block), and for the next
        block of the same samples (repeated calls with all T in one pass draw once)."""
        if self._pass is not None:
            raise RuntimeError("MCDropout.sampling cannot be nested")
        hooks = [
            (layer.module, functools.partial(self._masked_output, index))
            for index, layer in enumerate(self.stochastic_layers)
        ]
        reusable = self._last_pass is not None and self._last_pass.samples == samples
        self._pass = _Pass(samples, self._last_pass.masks if reusable else {})
        self._last_pass = None  # a chunk's masks are freed before the next chunk's are drawn
        try:
            with preserved_training_modes(self.model), forward_hooks(hooks):
                self.model.eval()
                yield
        finally:
            self._last_pass, self._pass = self._pass, None

    def run_rows(self, args: Tuple[object, ...], row_samples: Tensor) -> Tensor:
        """Run the model on ``args`` with row r of the batch through sub-network
        ``row_samples[r]`` (one of the ``sampling`` block's); only inside ``sampling``."""
        if self._pass is None:
            raise RuntimeError("MCDropout.run_rows runs only inside `with mc_model.sampling(...)`")
        self._pass.row_positions = row_samples - self._pass.samples.start
        with no_global_random_draws(row_samples.device, _GLOBAL_DRAW_REFUSAL):
            output = self.model(*args)
        if (
            not isinstance(output, Tensor)
            or output.dim() == 0
            or output.shape[0] != len(row_samples)
        ):
            raise ValueError(
                f"the model must return a Tensor with the batch of {len(row_samples)} rows "
                f"in dimension 0, got {getattr(output, 'shape', type(output).__name__)}; "
                "wrap a model that returns a tuple (e.g. MONAI's ViT) in an nn.Module "
                "that returns the logits"
            )
        return output

    def _masked_output(self, layer_index: int, module: nn.Module, args, output: Tensor) -> Tensor:
        layer = self.stochastic_layers[layer_index]
        positions = self._pass.row_positions
        n_rows = len(positions)
        if output.dim() == 0 or output.shape[0] % n_rows:
            raise ValueError(
                f"layer {layer.name!r} got an input of shape {tuple(output.shape)}, but the "
                f"batch has {n_rows} rows; MCDropout needs the batch first in every "
                "stochastic layer's input (possibly folded with other rows, batch first)"
            )
        folds = output.shape[0] // n_rows
        self._pass.checkpointed = self._pass.checkpointed or _inside_activation_checkpoint()
        mask_shape = (folds, *_feature_mask_shape(layer, output))
        key = (layer_index, mask_shape, output.device, output.dtype)
        if key not in self._pass.masks:
            self._pass.masks[key] = self._draw_masks(layer_index, mask_shape, output)
        per_row = output.reshape(n_rows, folds, *output.shape[1:])
        return (per_row * self._pass.masks[key][positions]).reshape(output.shape)

    def _draw_masks(self, layer_index: int, mask_shape: Tuple[int, ...], like: Tensor) -> Tensor:
        """Masks (len(samples), *mask_shape) of one layer for the pass's sub-networks:
        0 or ``keep_scale``, sub-network t from its own seed, on ``like``'s device."""
        layer = self.stochastic_layers[layer_index]
        # The meta device (shapes without values) has no generator and needs none.
        generator = None if like.device.type == "meta" else torch.Generator(device=like.device)
        masks = torch.empty((len(self._pass.samples), *mask_shape), device=like.device, dtype=like.dtype)
        for position, sample in enumerate(self._pass.samples):
            if generator is not None:
                generator.manual_seed(_sample_seed(self._layer_seeds[layer_index], sample))
            uniform = torch.rand(mask_shape, generator=generator, device=like.device)
            masks[position] = (uniform >= layer.drop_probability) * layer.keep_scale
        return masks


class _RecomputedWithMasks(torch.autograd.Function):
    """The outputs of an activation-checkpointed model, whose backward runs the MC
    passes again inside their sampling blocks (so that the checkpointed blocks
    recompute with the sub-networks' masks) and differentiates them."""

    @staticmethod
    def forward(ctx, mc_model, passes, outputs, *differentiable):
        ctx.mc_model, ctx.passes = mc_model, passes
        ctx.save_for_backward(*differentiable)
        return outputs.view_as(outputs)

    @staticmethod
    def backward(ctx, grad_outputs):
        saved = ctx.saved_tensors
        inputs, additional_forward_args, mc_samples_batch_size = ctx.passes
        n_inputs = len(_format_tensor_into_tuples(inputs))
        input_leaves = tuple(x.detach().requires_grad_(x.requires_grad) for x in saved[:n_inputs])
        targets = [*input_leaves, *saved[n_inputs:]]
        wanted = [t for t in targets if t.requires_grad]
        totals: List[Optional[Tensor]] = [None] * len(wanted)
        start = 0
        with torch.enable_grad():
            passes = ctx.mc_model._outputs_by_pass(
                _format_output(isinstance(inputs, tuple), input_leaves),
                additional_forward_args,
                mc_samples_batch_size,
            )
            for outputs in passes:  # differentiated inside the pass's sampling block
                stop = start + outputs.shape[0]
                gradients = torch.autograd.grad(outputs, wanted, grad_outputs[start:stop], allow_unused=True)
                totals = [_sum_of_gradients(total, g) for total, g in zip(totals, gradients)]
                start = stop
        by_target = iter(totals)
        return (None, None, None, *(next(by_target) if t.requires_grad else None for t in targets))


def _sum_of_gradients(total: Optional[Tensor], gradient: Optional[Tensor]) -> Optional[Tensor]:
    if total is None:
        return gradient
    return total if gradient is None else total + gradient


class _Pass:
    """The state of one ``sampling`` block: its sub-networks, the rows' positions
    among them, and the masks drawn so far."""

    def __init__(self, samples: range, masks: Dict[tuple, Tensor]) -> None:
        self.samples = samples
        self.row_positions: Optional[Tensor] = None
        self.masks = masks
        self.checkpointed = False  # a stochastic layer ran inside torch.utils.checkpoint


def _log_probabilities(logits: Tensor, activation: str) -> Tuple[Tensor, int]:
    """Log-probabilities of logits (t, N, ...) and the negative class dimension."""
    if activation == "softmax":
        if logits.dim() < 3 or logits.shape[2] < 2:
            raise ValueError(
                "activation='softmax' needs model outputs (N, C, ...) with C >= 2 "
                f"classes in dimension 1, got shape {tuple(logits.shape[1:])}; use "
                "activation='sigmoid' for single-logit outputs"
            )
        return logits.log_softmax(2), 2 - logits.dim()
    # log(1 - sigmoid(z)) = logsigmoid(-z), exact where 1 - sigmoid(z) rounds to 0.
    return torch.stack([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=-1), -1


def _inside_activation_checkpoint() -> bool:
    """Whether the caller runs inside ``torch.utils.checkpoint``, which recomputes
    during backward, when the sampling hooks may be gone."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.endswith(_CHECKPOINT_FILE):
            return True
        frame = frame.f_back
    return False


def _sample_seed(layer_seed: int, sample: int) -> int:
    return (layer_seed * 1_000_003 + sample) % 2**63


def _feature_mask_shape(layer: StochasticLayer, output: Tensor) -> Tuple[int, ...]:
    """The shape of one row's mask (broadcast over the rest of the row)."""
    if layer.mask_kind == "element":
        return tuple(output.shape[1:])
    if layer.mask_kind == "sample":
        return (1,) * (output.dim() - 1)
    expected_dim = _CHANNEL_WISE_INPUT_DIMS[type(layer.module)]
    if output.dim() != expected_dim:
        raise ValueError(
            f"{type(layer.module).__name__} layer {layer.name!r} got a {output.dim()}-D input "
            f"of shape {tuple(output.shape)}; MCDropout needs batched {expected_dim}-D "
            "inputs (N, C, ...)"
        )
    return (output.shape[1],) + (1,) * (expected_dim - 2)


def find_stochastic_layers(model: nn.Module) -> List[StochasticLayer]:
    """The layers of ``model`` MCDropout samples (p > 0); refuses randomness it cannot fix."""
    layers = []
    for name, module in model.named_modules():
        label = name or type(model).__name__
        _refuse_unfixable_randomness(label, module)
        layer = _stochastic_layer(label, module) or _drop_connect_layer(label, module)
        if layer is not None and layer.drop_probability > 0:
            layers.append(layer)
    if not layers:
        raise ValueError(
            f"model ({type(model).__name__}) has no nn.Dropout, nn.Dropout1d/2d/3d or "
            "stochastic-depth layer with p > 0; MC dropout needs at least one"
        )
    return layers


def _stochastic_layer(label: str, module: nn.Module) -> Optional[StochasticLayer]:
    if type(module) in _SUPPORTED_DROPOUT:
        kind = "element" if type(module) is nn.Dropout else "channel"
        return StochasticLayer(label, module, module.p, _keep_scale(module.p), kind)
    class_name = type(module).__name__
    if class_name == "DropPath" and hasattr(module, "drop_prob"):  # MONAI, timm
        p = module.drop_prob
        scale = _keep_scale(p) if getattr(module, "scale_by_keep", True) else 1.0
        return StochasticLayer(label, module, p, scale, "sample")
    if class_name == "StochasticDepth" and hasattr(module, "p"):  # torchvision
        return StochasticLayer(label, module, module.p, _keep_scale(module.p), "sample")
    return None


def _drop_connect_layer(label: str, module: nn.Module) -> Optional[StochasticLayer]:
    """MONAI's EfficientNet block applies drop_connect, a function (stochastic depth:
    one draw per example), to the output of its ``_bn2`` when it has a skip
    connection; sampling that output does the same per sub-network."""
    rate = getattr(module, "drop_connect_rate", None)
    if not rate or not isinstance(getattr(module, "_bn2", None), nn.Module):
        return None
    if not (module.id_skip and module.stride == 1 and module.in_channels == module.out_channels):
        return None
    return StochasticLayer(f"{label}._bn2", module._bn2, rate, _keep_scale(rate), "sample")


def _keep_scale(p: float) -> float:
    return 1.0 / (1.0 - p) if p < 1 else 0.0


def _refuse_unfixable_randomness(label: str, module: nn.Module) -> None:
    if isinstance(module, _UNSUPPORTED_DROPOUT) and type(module) not in _SUPPORTED_DROPOUT:
        raise ValueError(
            f"{label!r} is a {type(module).__name__}; MCDropout controls only "
            "nn.Dropout and nn.Dropout1d/2d/3d (not their subclasses or alpha dropout)"
        )
    if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
        raise ValueError(
            f"{label!r} is an nn.MultiheadAttention with dropout={module.dropout}; its "
            "attention dropout cannot take a fixed mask. Set its dropout to 0 (use "
            "nn.Dropout layers for MC sampling)"
        )
    if getattr(module, "use_flash_attention", False) and getattr(module, "dropout_rate", 0) > 0:
        raise ValueError(
            f"{label!r} ({type(module).__name__}) calls F.scaled_dot_product_attention with "
            f"dropout_p={module.dropout_rate}, which draws new masks at every call, even "
            "in eval mode. Build it with use_flash_attention=False (its attention "
            "dropout is then an nn.Dropout, which MCDropout samples) or dropout_rate=0"
        )
