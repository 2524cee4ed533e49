"""Monte-Carlo dropout: T fixed-mask sub-networks, their uncertainty and attributions.

Gal & Ghahramani (2016) read dropout at test time as sampling T sub-networks from an
approximate posterior; Seo (2019) shows the resulting uncertainty maps beside saliency
maps for medical images. Here sub-network t applies one dropout mask to every example
of a batch, so each f_t is an ordinary deterministic function: attribution axioms such
as Integrated Gradients' completeness hold for each f_t, and results do not depend on
the batch size or on how the T samples are chunked.
"""

import contextlib
import functools
import math
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from captum.attr import Attribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_gradmask._compat import (
    _format_additional_forward_args,
    _format_tensor_into_tuples,
    _is_tuple,
)
from captum_gradmask._state import preserved_training_modes
from captum_gradmask._validation import (
    check_baselines,
    check_batch_size,
    check_finite_results,
    check_float_inputs,
    check_target_in_range,
    check_values,
    is_int,
)

# Input dimensions (batch included) of the channel-wise layers; nn.Dropout masks every
# element and takes any shape.
_CHANNEL_WISE_INPUT_DIMS = {nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5}
_SUPPORTED_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_UNSUPPORTED_DROPOUT = (nn.AlphaDropout, nn.FeatureAlphaDropout) + _SUPPORTED_DROPOUT


class Uncertainty(NamedTuple):
    """Predictive uncertainty over T Monte-Carlo samples (entropies in nats).

    For softmax outputs (N, C, *spatial) the class dimension is reduced: ``mean`` is
    (N, C, *spatial), the other fields (N, *spatial). For sigmoid outputs every output
    is its own binary variable: all fields have the output's shape and ``mean`` is the
    probability of the positive class.
    """

    mean: Tensor  #: pbar = mean over t of p_t
    predictive_entropy: Tensor  #: total uncertainty H[pbar]
    expected_entropy: Tensor  #: aleatoric part E_t H[p_t]
    mutual_information: Tensor  #: epistemic part H[pbar] - E_t H[p_t] >= 0
    variation_ratio: Tensor  #: 1 - (votes for the most voted class) / T


def predictive_uncertainty(probs: Tensor) -> Uncertainty:
    r"""Uncertainty of stacked class probabilities from T stochastic forward passes.

    Args:
        probs (Tensor): probabilities of shape (T, N, C, *spatial) that sum to one over
            the class dimension 2. For binary sigmoid outputs p, stack ``1 - p`` and
            ``p`` in dimension 2.

    Returns:
        Uncertainty: ``mean`` (N, C, *spatial); the entropies, mutual information and
        variation ratio (N, *spatial).

    Examples::

        >>> probs = torch.softmax(torch.randn(20, 4, 3), dim=2)   # T=20, N=4, C=3
        >>> predictive_uncertainty(probs).mutual_information.shape
        torch.Size([4])
    """
    _check_probabilities(probs)
    return _uncertainty_from_log_probs(probs.log(), class_dim=2 - probs.dim())


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

    def forward(self, inputs, mc_samples_batch_size: Optional[int] = None) -> Tensor:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): the model's float inputs, batch of N
                in dimension 0; a tuple is passed to the model as separate arguments.
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
        batch_size = inputs_tuple[0].shape[0]
        outputs = []
        with self._fixed_masks():
            for samples in self._sample_chunks(samples_per_pass, inputs_tuple[0].device):
                rows = _repeat_batch(inputs_tuple, len(samples), batch_size)
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
            return _uncertainty_from_log_probs(logits.log_softmax(2), class_dim=2 - logits.dim())
        # log(1 - sigmoid(z)) = logsigmoid(-z), exact where 1 - sigmoid(z) rounds to 0.
        log_probs = torch.stack([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=-1)
        result = _uncertainty_from_log_probs(log_probs, class_dim=-1)
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


class MCAttribution(Attribution):
    r"""Mean (and spread) of an attribution method over the T sub-networks of an
    ``MCDropout`` model.

    The T attributions are computed in batched passes: the inputs are replicated for
    a chunk of samples and each replicated row runs through its own sub-network, so the
    result equals a loop over t. Any Captum attribution works, including layer methods,
    ``NoiseTunnel`` (through a factory, see ``attribution_cls``) and ``ContrastSaliency``.

    Args:
        attribution_cls (callable): an attribution class, or any callable that takes a
            forward function first and returns a Captum ``Attribution``, e.g.
            ``lambda forward: NoiseTunnel(Saliency(forward))``.
        mc_model (MCDropout): the sub-networks.
        **attribution_init_kwargs: further arguments of ``attribution_cls``, e.g.
            ``layer=`` for layer methods.

    Examples::

        >>> mc_model = MCDropout(classifier, n_samples=20)
        >>> mean, std = MCAttribution(IntegratedGradients, mc_model).attribute(
        ...     images, target=1, return_std=True, n_steps=50)
    """

    def __init__(
        self,
        attribution_cls: Callable[..., Attribution],
        mc_model: MCDropout,
        **attribution_init_kwargs,
    ) -> None:
        if not isinstance(mc_model, MCDropout):
            raise TypeError(f"mc_model must be an MCDropout, got {type(mc_model).__name__}")
        sub_networks = _SubNetworkForward(mc_model)
        super().__init__(sub_networks)
        self.mc_model = mc_model
        self.attribution_method = attribution_cls(sub_networks, **attribution_init_kwargs)
        if not isinstance(self.attribution_method, Attribution):
            raise TypeError(
                "attribution_cls must return a Captum Attribution, got "
                f"{type(self.attribution_method).__name__}"
            )

    @log_usage()
    def attribute(
        self,
        inputs,
        target=None,
        return_std: bool = False,
        additional_forward_args: Optional[object] = None,
        mc_samples_batch_size: Optional[int] = None,
        **kwargs,
    ):
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): float inputs, batch of N in dimension 0.
            target (int, tuple, Tensor or list, optional): as in Captum.
            return_std (bool): also return the standard deviation over the T samples
                (dividing by T). Default: False
            additional_forward_args (Any, optional): passed to the model after the inputs.
            mc_samples_batch_size (int, optional): how many of the T samples one call of
                the attribution method covers (it sees N times that many rows). Default:
                all T at once.
            **kwargs: passed to the attribution method's ``attribute``. Tensors whose
                dimension 0 has size N (per-example ``baselines``, ``feature_mask``,
                additional forward arguments) are replicated with the inputs; others
                are passed as they are. ``return_convergence_delta`` is not supported.

        Returns:
            The mean attribution, structured and shaped as the method returns it (like
            the inputs for input attributions), or ``(mean, std)`` if ``return_std``.
        """
        is_inputs_tuple = _is_tuple(inputs)
        inputs_tuple = check_float_inputs(inputs, forward_func=self.mc_model.model)
        check_baselines(kwargs.get("baselines"), inputs_tuple)
        batch_size = inputs_tuple[0].shape[0]
        _check_target(target, batch_size)
        if kwargs.get("return_convergence_delta"):
            raise ValueError("return_convergence_delta=True is not supported by MCAttribution")
        samples_per_pass = check_batch_size(
            mc_samples_batch_size, "mc_samples_batch_size", self.mc_model.n_samples
        )
        forward_args = _format_additional_forward_args(additional_forward_args) or ()
        inputs_tuple = tuple(x.detach() for x in inputs_tuple)  # caller's graph untouched

        def check_target_on_outputs(module, args, outputs) -> None:
            check_target_in_range(target, (batch_size, *outputs.shape[1:]))

        chunks = []
        target_check = self.forward_func.register_forward_hook(check_target_on_outputs)
        with self.mc_model._fixed_masks(), target_check:  # the handle removes the hook
            for samples in self.mc_model._sample_chunks(samples_per_pass, inputs_tuple[0].device):
                attributions = self._attribute_samples(
                    samples, inputs_tuple, is_inputs_tuple, target, forward_args, kwargs
                )
                returns_tuple = isinstance(attributions, tuple)
                chunks.append(
                    tuple(
                        a.unflatten(0, (len(samples), batch_size))
                        for a in _format_tensor_into_tuples(attributions)
                    )
                )
        per_sample = [torch.cat(parts) for parts in zip(*chunks)]
        mean = tuple(a.mean(0) for a in per_sample)
        std = tuple(a.std(0, correction=0) for a in per_sample)
        check_finite_results(mean + std, "the attributions")
        if not returns_tuple:
            mean, std = mean[0], std[0]
        return (mean, std) if return_std else mean

    def _attribute_samples(
        self, samples, inputs_tuple, is_inputs_tuple, target, forward_args, kwargs
    ):
        """One call of the attribution method on the inputs replicated for ``samples``;
        row t * N + n of its outputs belongs to sub-network samples[t] and example n."""
        copies, batch_size = len(samples), inputs_tuple[0].shape[0]
        # Our own copies: asking for gradients here leaves the caller's flags alone and
        # spares Captum's warning about inputs without gradients.
        rows = tuple(
            row.requires_grad_() for row in _repeat_batch(inputs_tuple, copies, batch_size)
        )
        return self.attribution_method.attribute(
            rows if is_inputs_tuple else rows[0],
            target=_repeat_target(target, copies),
            additional_forward_args=(
                *_repeat_batch(forward_args, copies, batch_size),
                samples.repeat_interleave(batch_size),
            ),
            **{key: _repeat_batch(value, copies, batch_size) for key, value in kwargs.items()},
        )


class _SubNetworkForward(nn.Module):
    """The model with row r of the batch run through sub-network ``row_samples[r]``,
    given as the last argument (Captum replicates it together with the inputs)."""

    def __init__(self, mc_model: MCDropout) -> None:
        super().__init__()
        self.mc_model = mc_model

    def forward(self, *args: object) -> Tensor:
        *model_args, row_samples = args
        return self.mc_model._run_rows(tuple(model_args), row_samples)


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


def _uncertainty_from_log_probs(log_probs: Tensor, class_dim: int) -> Uncertainty:
    """``log_probs`` (T, N, ...) with classes in the negative dimension ``class_dim``."""
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])
    predictive_entropy = _entropy(log_mean, class_dim)
    expected_entropy = _entropy(log_probs, class_dim).mean(0)
    # H[pbar] >= E_t H[p_t] by concavity; rounding can leave a tiny negative difference.
    mutual_information = (predictive_entropy - expected_entropy).clamp_min(0)
    return Uncertainty(
        log_mean.exp(),
        predictive_entropy,
        expected_entropy,
        mutual_information,
        _variation_ratio(log_probs, class_dim),
    )


def _entropy(log_probs: Tensor, class_dim: int) -> Tensor:
    probs = log_probs.exp()
    # 0 log 0 = 0 as in xlogy: log_probs is -inf exactly where probs is 0.
    return -torch.where(probs > 0, probs * log_probs, 0.0).sum(class_dim)


def _variation_ratio(log_probs: Tensor, class_dim: int) -> Tensor:
    n_samples, n_classes = log_probs.shape[0], log_probs.shape[class_dim]
    votes = F.one_hot(log_probs.argmax(class_dim), n_classes).sum(0)
    modal_votes = votes.max(-1).values
    return 1 - modal_votes.to(log_probs.dtype) / n_samples


def _check_probabilities(probs: object) -> None:
    if not isinstance(probs, Tensor):
        raise TypeError(f"probs must be a Tensor, got {type(probs).__name__}")
    if not probs.dtype.is_floating_point:
        raise TypeError(f"probs must have a floating-point dtype, got {probs.dtype}")
    if probs.dim() < 3 or probs.numel() == 0:
        raise ValueError(
            "probs must have shape (T, N, C, ...) with no empty dimension, got "
            f"{tuple(probs.shape)}"
        )
    tolerance = max(1e-4, 8 * torch.finfo(probs.dtype).eps)
    check_values(
        lambda: (probs >= 0) & ((probs.sum(2, keepdim=True) - 1).abs() <= tolerance),
        "probs must be non-negative and sum to 1 over the class dimension 2 (within "
        f"{tolerance:g}). Pass probabilities, not logits",
    )


def _check_target(target: object, batch_size: int) -> None:
    """Per-example targets must have one entry per example; other forms are Captum's."""
    if isinstance(target, list) and len(target) != batch_size:
        raise ValueError(
            f"target has {len(target)} entries but inputs have {batch_size} examples; "
            "give one entry per example or a single int/tuple"
        )
    if isinstance(target, Tensor) and target.numel() > 1 and tuple(target.shape) != (batch_size,):
        raise ValueError(
            f"target as a Tensor must have shape ({batch_size},), one entry per example, "
            f"or one element; got shape {tuple(target.shape)}"
        )


def _repeat_target(target: object, copies: int) -> object:
    if isinstance(target, list):
        return target * copies
    if isinstance(target, Tensor) and target.numel() > 1:
        return target.repeat(copies)
    return target


def _repeat_batch(value: object, copies: int, batch_size: int) -> object:
    """Repeat ``value`` ``copies`` times along dimension 0 if it is a batch of
    ``batch_size`` rows (or a tuple of them); leave anything else as it is."""
    if isinstance(value, tuple):
        return tuple(_repeat_batch(item, copies, batch_size) for item in value)
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    return value
