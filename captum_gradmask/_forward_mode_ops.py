"""Operations recomposed so that reverse-over-forward AD differentiates them right.

In PyTorch (measured on 2.13) the backward of a forward-mode tangent is wrong for
``batch_norm`` with batch statistics, ``instance_norm`` and ``layer_norm`` (relative
error 0.2 to 1.8 against double backprop and against finite differences: the
tangent formulas read the statistics as constants), and fails with an in-place
error for ``softmax``, ``log_softmax``, ``logsumexp`` and attention; ``group_norm``
is right but its native tangent is slow (1.8x the composition, measured on CPU).
Inside ``recomposed_for_forward_mode()`` these run as compositions of elementary
operations whose tangents are differentiated exactly. Everything else runs as is.
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def _softmax(input: Tensor, dim: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    input = input if dtype is None else input.to(dtype)
    exponentials = (input - input.detach().amax(dim, keepdim=True)).exp()
    return exponentials / exponentials.sum(dim, keepdim=True)


def _logsumexp(input: Tensor, dim, keepdim: bool = False) -> Tensor:
    shift = input.detach().amax(dim, keepdim=True)
    result = (input - shift).exp().sum(dim, keepdim=True).log() + shift
    return result if keepdim else result.squeeze(dim)


def _log_softmax(input: Tensor, dim: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    input = input if dtype is None else input.to(dtype)
    return input - _logsumexp(input, dim, keepdim=True)


def _normalized(input: Tensor, dims: Sequence[int], eps: float) -> Tensor:
    mean = input.mean(dims, keepdim=True)
    variance = (input - mean).pow(2).mean(dims, keepdim=True)
    return (input - mean) * (variance + eps).rsqrt()


def _per_channel_affine(normalized: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    shape = (1, -1) + (1,) * (normalized.dim() - 2)
    if weight is not None:
        normalized = normalized * weight.reshape(shape)
    if bias is not None:
        normalized = normalized + bias.reshape(shape)
    return normalized


def _batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
) -> Tensor:
    if not training and running_mean is not None:  # running statistics: constants
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    # This private pass runs on copies of the buffers, so the running statistics
    # are not updated here.
    dims = [0, *range(2, input.dim())]
    return _per_channel_affine(_normalized(input, dims, eps), weight, bias)


def _instance_norm(
    input, running_mean=None, running_var=None, weight=None, bias=None,
    use_input_stats=True, momentum=0.1, eps=1e-5,
) -> Tensor:
    if not use_input_stats:
        return F.instance_norm(
            input, running_mean, running_var, weight, bias, False, momentum, eps
        )
    dims = list(range(2, input.dim()))
    return _per_channel_affine(_normalized(input, dims, eps), weight, bias)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5) -> Tensor:
    dims = list(range(input.dim() - len(normalized_shape), input.dim()))
    normalized = _normalized(input, dims, eps)
    if weight is not None:
        normalized = normalized * weight
    return normalized if bias is None else normalized + bias


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5) -> Tensor:
    grouped = input.reshape(input.shape[0], num_groups, -1)
    normalized = _normalized(grouped, [-1], eps).reshape(input.shape)
    return _per_channel_affine(normalized, weight, bias)


def _attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
) -> Tensor:
    if dropout_p > 0 or enable_gqa:
        raise NotImplementedError(
            "method='forward_mode' runs scaled_dot_product_attention without attention "
            "dropout or grouped-query attention; put the model in eval mode or set its "
            "attention dropout to 0"
        )
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return _softmax(scores, -1) @ value


_RECOMPOSED = {
    F.batch_norm: _batch_norm,
    F.instance_norm: _instance_norm,
    F.layer_norm: _layer_norm,
    F.group_norm: _group_norm,
    F.softmax: lambda input, dim=None, _stacklevel=3, dtype=None: _softmax(input, dim, dtype),
    torch.softmax: _softmax,
    Tensor.softmax: _softmax,
    F.log_softmax: lambda input, dim=None, _stacklevel=3, dtype=None: _log_softmax(input, dim, dtype),
    torch.log_softmax: _log_softmax,
    Tensor.log_softmax: _log_softmax,
    torch.logsumexp: _logsumexp,
    Tensor.logsumexp: _logsumexp,
    F.scaled_dot_product_attention: _attention,
}


class recomposed_for_forward_mode(TorchFunctionMode):
    """Within this context the operations above run as their compositions."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _RECOMPOSED.get(func, func)(*args, **(kwargs or {}))
