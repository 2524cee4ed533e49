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
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_gradmask._batching import repeat_examples
from captum_gradmask._compat import _format_additional_forward_args
from captum_gradmask._state import preserved_training_modes
from captum_gradmask._validation import (
    check_batch_size,
    check_finite_results,
    check_float_inputs,
    is_int,
)
from captum_gradmask.uncertainty import Uncertainty, uncertainty_from_log_probs

# Input dimensions (batch included) of the channel-wise layers; nn.Dropout masks every
# element and takes any shape.
_CHANNEL_WISE_INPUT_DIMS = {nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5}
_SUPPORTED_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_UNSUPPORTED_DROPOUT = (nn.AlphaDropout, nn.FeatureAlphaDropout) + _SUPPORTED_DROPOUT


class MCDropout(nn.Module):
    r"""T dropout sub-networks of ``model``, evaluated together.

    Sub-network t multiplies the input of every dropout layer by a mask drawn once for
    t and shared by all examples: element-wise for ``nn.Dropout``, one value per
    channel for ``nn.Dropout1d/2d/3d``. Masks come from a private generator seeded by
    ``seed``: the same ``seed`` gives the same sub-networks on any device, for any batch
    size and chunking, and the global random state is never used. During a call the
    model is in eval mode (BatchNorm uses its running statistics and does not update
    them); modes are restored afterwards, also after an exception.

    Refused: a model without ``nn.Dropout``/``Dropout1d/2d/3d``, ``AlphaDropout``,
    ``FeatureAlphaDropout``, subclasses of the dropout layers, and
    ``nn.MultiheadAttention`` with ``dropout > 0`` (its attention dropout cannot take a
    fixed mask; set its ``dropout`` to 0). A model that draws from the global random
    generator during the forward pass (e.g. ``F.dropout(x, training=True)``) raises a
    RuntimeError. ``F.dropout(x, training=self.training)`` cannot be detected: it is
    off in eval mode, so it does not take part in sampling. A dropout layer called
    twice in one forward pass applies the same mask both times. Every dropout input
    must keep the batch in dimension 0.

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
        self._dropout_layers = _find_dropout_layers(model)
        # One independent seed per layer, so each layer's masks depend only on
        # (seed, layer, T, feature shape).
        seeds = torch.randint(
            0, 2**62, (len(self._dropout_layers),), generator=torch.Generator().manual_seed(seed)
        )
        self._layer_seeds = seeds.tolist()
        self._row_samples: Optional[Tensor] = None

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
        inputs_tuple = check_float_inputs(inputs, forward_func=self.model)
        samples_per_pass = check_batch_size(
            mc_samples_batch_size, "mc_samples_batch_size", self.n_samples
        )
        model_args = inputs_tuple + (_format_additional_forward_args(additional_forward_args) or ())
        batch_size = inputs_tuple[0].shape[0]
        outputs = []
        with self._fixed_masks():
            for samples in self._sample_chunks(samples_per_pass, inputs_tuple[0].device):
                rows = repeat_examples(model_args, len(samples), batch_size)
                output = self._run_rows(rows, samples.repeat_interleave(batch_size))
                outputs.append(output.unflatten(0, (len(samples), batch_size)))
        stacked = torch.cat(outputs)
        check_finite_results((stacked,), "the model outputs")
        return stacked

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
        logits = self(inputs, mc_samples_batch_size=mc_samples_batch_size)
        if activation == "softmax":
            if logits.dim() < 3 or logits.shape[2] < 2:
                raise ValueError(
                    "activation='softmax' needs model outputs (N, C, ...) with C >= 2 "
                    f"classes in dimension 1, got shape {tuple(logits.shape[1:])}; use "
                    "activation='sigmoid' for single-logit outputs"
                )
            return uncertainty_from_log_probs(logits.log_softmax(2), class_dim=2 - logits.dim())
        # log(1 - sigmoid(z)) = logsigmoid(-z), exact where 1 - sigmoid(z) rounds to 0.
        log_probs = torch.stack([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=-1)
        result = uncertainty_from_log_probs(log_probs, class_dim=-1)
        return result._replace(mean=result.mean[..., 1])

    def _sample_chunks(self, samples_per_pass: int, device: torch.device) -> Tuple[Tensor, ...]:
        return torch.arange(self.n_samples, device=device).split(samples_per_pass)

    @contextlib.contextmanager
    def _fixed_masks(self) -> Iterator[None]:
        """While active, the model is in eval mode and every dropout layer multiplies
        row r of its input by the mask of sub-network ``self._row_samples[r]``."""
        masks: Dict[tuple, Tensor] = {}  # drawn at first use, kept for the whole call
        layers = [layer for _, layer in self._dropout_layers]
        own_forwards = [layer.__dict__.get("forward") for layer in layers]
        with preserved_training_modes(self.model):
            self.model.eval()
            try:
                for index, layer in enumerate(layers):
                    layer.forward = functools.partial(self._masked_dropout, index, masks)
                yield
            finally:
                for layer, forward in zip(layers, own_forwards):
                    del layer.forward
                    if forward is not None:
                        layer.forward = forward

    def _run_rows(self, args: Tuple[object, ...], row_samples: Tensor) -> Tensor:
        """Run the model with row r of the batch through sub-network ``row_samples[r]``;
        only inside ``_fixed_masks``."""
        self._row_samples = row_samples
        try:
            with _no_global_random_draws(row_samples.device):
                output = self.model(*args)
        finally:
            self._row_samples = None
        if (
            not isinstance(output, Tensor)
            or output.dim() == 0
            or output.shape[0] != len(row_samples)
        ):
            raise ValueError(
                f"the model must return a Tensor with the batch of {len(row_samples)} rows "
                f"in dimension 0, got {getattr(output, 'shape', type(output).__name__)}"
            )
        return output

    def _masked_dropout(
        self, layer_index: int, masks: Dict[tuple, Tensor], input: Tensor
    ) -> Tensor:
        name, layer = self._dropout_layers[layer_index]
        row_samples = self._row_samples
        if input.dim() == 0 or input.shape[0] != len(row_samples):
            raise ValueError(
                f"dropout layer {name!r} got an input of shape {tuple(input.shape)}, but "
                f"the batch has {len(row_samples)} rows; MCDropout needs every dropout "
                "input to keep the batch in dimension 0"
            )
        feature_shape = _mask_feature_shape(name, layer, input)
        key = (layer_index, feature_shape, input.device, input.dtype)
        if key not in masks:
            masks[key] = self._draw_masks(layer_index, feature_shape, input)
        return input * masks[key][row_samples]

    def _draw_masks(self, layer_index: int, feature_shape: Tuple[int, ...], like: Tensor) -> Tensor:
        """Scaled keep-masks (T, *feature_shape) of one layer: 0 or 1 / (1 - p)."""
        p = self._dropout_layers[layer_index][1].p
        generator = torch.Generator().manual_seed(self._layer_seeds[layer_index])
        # Drawn on the CPU so that a seed gives the same sub-networks on every device.
        uniform = torch.rand((self.n_samples, *feature_shape), generator=generator)
        keep = (uniform >= p).to(device=like.device, dtype=like.dtype)
        return keep * (1.0 / (1.0 - p)) if p < 1 else keep


def _find_dropout_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    layers = []
    for name, module in model.named_modules():
        label = name or type(model).__name__
        if type(module) in _SUPPORTED_DROPOUT:
            layers.append((label, module))
        elif isinstance(module, _UNSUPPORTED_DROPOUT):
            raise ValueError(
                f"{label!r} is a {type(module).__name__}; MCDropout controls only "
                "nn.Dropout and nn.Dropout1d/2d/3d (not their subclasses or alpha dropout)"
            )
        elif isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
            raise ValueError(
                f"{label!r} is an nn.MultiheadAttention with dropout={module.dropout}; its "
                "attention dropout cannot take a fixed mask. Set its dropout to 0 (use "
                "nn.Dropout layers for MC sampling)"
            )
    if not layers:
        raise ValueError(
            f"model ({type(model).__name__}) has no nn.Dropout or nn.Dropout1d/2d/3d "
            "layer; MC dropout needs at least one"
        )
    if all(layer.p == 0 for _, layer in layers):
        raise ValueError("every dropout layer of model has p=0; MC dropout needs p > 0")
    return layers


def _mask_feature_shape(name: str, layer: nn.Module, input: Tensor) -> Tuple[int, ...]:
    expected_dim = _CHANNEL_WISE_INPUT_DIMS.get(type(layer))
    if expected_dim is None:
        return tuple(input.shape[1:])
    if input.dim() != expected_dim:
        raise ValueError(
            f"{type(layer).__name__} layer {name!r} got a {input.dim()}-D input of shape "
            f"{tuple(input.shape)}; MCDropout needs batched {expected_dim}-D inputs (N, C, ...)"
        )
    return (input.shape[1],) + (1,) * (expected_dim - 2)


@contextlib.contextmanager
def _no_global_random_draws(device: torch.device) -> Iterator[None]:
    """Raise if the block drew from the global random generators; restore them in any case."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        cpu_changed = not torch.equal(torch.get_rng_state(), cpu_state)
        cuda_changed = cuda_state is not None and not torch.equal(
            torch.cuda.get_rng_state(device), cuda_state
        )
        if cpu_changed:
            torch.set_rng_state(cpu_state)
        if cuda_changed:
            torch.cuda.set_rng_state(cuda_state, device)
    if cpu_changed or cuda_changed:
        raise RuntimeError(
            "the model drew from the global random generator during an MC-dropout pass "
            "(e.g. F.dropout(x, training=True) or a random layer in forward); MCDropout "
            "can only fix the masks of nn.Dropout and nn.Dropout1d/2d/3d layers"
        )
