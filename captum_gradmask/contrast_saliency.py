"""Contrast saliency: the input gradient of |y_target - y_contrast|."""

from typing import Callable, List, Optional

from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor

from captum_gradmask._compat import _format_output, _is_tuple
from captum_gradmask._validation import (
    IndexTuple,
    check_finite_results,
    warn_at_caller,
    check_float_inputs,
    check_targets_in_range,
    per_example_targets,
    select_targets,
)


class ContrastSaliency(GradientAttribution):
    r"""Gradient of the absolute difference of two outputs with respect to the inputs.

    For each example b, the attribution is d|f(x)_b[target] - f(x)_b[contrast_target]|
    / d x_b: where the input moves the model between two classes, as in GradMask
    (Simpson et al., MIDL 2019, eq. 2). With a two-logit classifier it shows what
    separates the classes rather than what raises one logit.

    Args:
        forward_func (Callable): the model or any function returning outputs with the
            batch in dimension 0.

    Examples::

        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> x = torch.randn(4, 1, 4, 4)
        >>> attributions = ContrastSaliency(model).attribute(x, target=1, contrast_target=0)
        >>> attributions.shape
        torch.Size([4, 1, 4, 4])
    """

    def __init__(self, forward_func: Callable[..., Tensor]) -> None:
        """Arguments: see the class docstring."""
        super().__init__(forward_func)

    @log_usage()
    def attribute(
        self,
        inputs,
        target=1,
        contrast_target=0,
        abs: bool = True,
        additional_forward_args: Optional[object] = None,
    ):
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): float inputs, batch in dimension 0.
            target (int, tuple, Tensor or list): the output compared, in any form
                Captum's ``Saliency`` accepts: an int (or a tuple for outputs with
                more than two dimensions) for all examples, or a list / 1-D tensor
                with one entry per example. Default: 1
            contrast_target (int, tuple, Tensor or list): the output it is compared
                with, in the same forms. A single value must differ from a single
                ``target``; an example whose per-example entries are equal gets a zero
                map, and one warning counts them. Under ``NoiseTunnel`` and
                ``sensitivity_max``, which repeat each example k times in a row and
                expand ``target`` to match, N per-example entries on a batch of k N
                rows are expanded the same way, provided ``target`` is per example
                too (so that its expansion shows). Default: 0
            abs (bool): return the absolute value of the gradient (as ``Saliency``
                does) if True, the signed gradient of |y_t - y_c| if False.
                Default: True
            additional_forward_args (Any, optional): passed to ``forward_func`` after
                the inputs, as in Captum.

        Returns:
            Tensor or tuple[Tensor, ...]: attributions shaped like ``inputs``.
        """
        is_inputs_tuple = _is_tuple(inputs)
        inputs_tuple = check_float_inputs(inputs, forward_func=self.forward_func)
        batch_size = inputs_tuple[0].shape[0]
        targets = per_example_targets(target, batch_size, "target")
        contrasts = per_example_targets(
            _expanded_like_target(contrast_target, target, batch_size), batch_size, "contrast_target"
        )

        def contrast_forward(*args: object) -> Tensor:
            output = self.forward_func(*args)
            if not isinstance(output, Tensor) or output.dim() == 0 or output.shape[0] != batch_size:
                raise ValueError(
                    "forward_func must return a Tensor with the batch of "
                    f"{batch_size} examples in dimension 0, got "
                    f"{getattr(output, 'shape', type(output).__name__)}"
                )
            check_targets_in_range(targets, output.shape, "target")
            check_targets_in_range(contrasts, output.shape, "contrast_target")
            _check_contrast_differs(
                _non_negative(targets, output.shape), _non_negative(contrasts, output.shape),
                target, contrast_target,
            )
            return (select_targets(output, targets) - select_targets(output, contrasts)).abs()

        # Inputs that do not require grad are replaced by leaf aliases that do, so
        # the caller's requires_grad flags are never touched.
        leaves = tuple(
            x if x.requires_grad else x.detach().requires_grad_() for x in inputs_tuple
        )
        gradients = self.gradient_func(
            contrast_forward, leaves, None, additional_forward_args
        )
        check_finite_results(gradients, "the contrast saliency")
        if abs:
            gradients = tuple(gradient.abs() for gradient in gradients)
        return _format_output(is_inputs_tuple, gradients)


def _expanded_like_target(contrast_target: object, target: object, batch_size: int) -> object:
    """Per-example contrasts for N examples on a batch of k N rows whose per-example
    ``target`` comes in runs of k equal entries: NoiseTunnel and sensitivity_max repeat
    each example k times in a row and expand ``target`` so; expand the contrasts alike."""
    contrasts, targets = _as_list(contrast_target), _as_list(target)
    if contrasts is None or not contrasts or len(contrasts) == batch_size:
        return contrast_target
    repeats, remainder = divmod(batch_size, len(contrasts))
    if remainder:
        return contrast_target  # refused with the count by per_example_targets
    runs = None if targets is None or len(targets) != batch_size else [
        targets[start : start + repeats] for start in range(0, batch_size, repeats)
    ]
    if runs is None or any(run != run[:1] * repeats for run in runs):
        raise ValueError(
            f"contrast_target has {len(contrasts)} entries but inputs have {batch_size} "
            "examples. If a wrapper (NoiseTunnel, sensitivity_max) repeated each example "
            f"{repeats} times, give target per example too, so that both are expanded alike"
        )
    return [entry for entry in contrasts for _ in range(repeats)]


def _as_list(value: object) -> Optional[list]:
    if isinstance(value, Tensor) and value.dim() == 1 and value.numel() > 1:
        return value.tolist()
    return value if isinstance(value, list) else None


def _non_negative(indices: List[IndexTuple], output_shape) -> List[IndexTuple]:
    sizes = output_shape[1:]
    return [tuple(i % size for i, size in zip(index, sizes)) for index in indices]


def _check_contrast_differs(targets, contrasts, target: object, contrast_target: object) -> None:
    """Equal single values are an error; rows with equal per-example entries get zero
    maps (|y_t - y_t| = 0 has zero gradient) and a warning that counts them."""
    equal_rows = [row for row, (t, c) in enumerate(zip(targets, contrasts)) if t == c]
    if not equal_rows:
        return
    if _as_list(target) is None and _as_list(contrast_target) is None:
        raise ValueError(
            "contrast_target must differ from target; got target="
            f"{target!r} and contrast_target={contrast_target!r}"
        )
    shown = ", ".join(map(str, equal_rows[:10])) + (", ..." if len(equal_rows) > 10 else "")
    warn_at_caller(
        f"target == contrast_target in {len(equal_rows)} of the {len(targets)} rows "
        f"ContrastSaliency received (rows {shown}; wrappers such as NoiseTunnel and "
        "MCAttribution repeat examples): their contrast saliency is zero"
    )
