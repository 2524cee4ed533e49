"""Operations whose forward-mode tangent is written out here, so that reverse-over-
forward AD differentiates it right, and fast.

In PyTorch (measured on 2.13) the backward of a forward-mode tangent is wrong for
``batch_norm`` with batch statistics, ``instance_norm`` and ``layer_norm`` (relative
error 0.2 to 1.8 against double backprop and against finite differences: the
tangent formulas read the statistics as constants), and fails with an in-place
error for ``softmax``, ``log_softmax``, ``logsumexp`` and attention; ``group_norm``
is right but slow. Inside ``recomposed_for_forward_mode()`` each of these computes
its output with the native kernel and its tangent from the formulas below, from
operations whose backward PyTorch gets right; the two are joined into one dual
tensor. Everything else runs as is.
"""

import math
from typing import Optional, Sequence

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def _with_tangent(output: Tensor, tangent: Tensor) -> Tensor:
    # Under autocast the tangent, scaled by a float32 weight, may be float32 where the
    # output is half.
    return forward_ad.make_dual(output, tangent.to(output.dtype))


def _normalization_tangent(
    input: Tensor, tangent: Tensor, dims: Sequence[int], eps: float
) -> Tensor:
    """Tangent of (x - mean) / sqrt(var + eps) over ``dims`` (biased variance):
    r * (t - mean(t) - xhat * mean(xhat * t))."""
    mean = input.mean(dims, keepdim=True)
    inverse_std = (input.var(dims, unbiased=False, keepdim=True) + eps).rsqrt()
    normalized = (input - mean) * inverse_std
    centred = tangent - tangent.mean(dims, keepdim=True)
    return inverse_std * (centred - normalized * (normalized * tangent).mean(dims, keepdim=True))


def _channel_scaled(tangent: Tensor, weight: Optional[Tensor]) -> Tensor:
    if weight is None:
        return tangent
    return tangent * weight.reshape((1, -1) + (1,) * (tangent.dim() - 2))


def _batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
) -> Tensor:
    primal, tangent = forward_ad.unpack_dual(input)
    uses_batch_statistics = training or running_mean is None
    if tangent is None or not uses_batch_statistics:  # running statistics: constants
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    # This private pass runs on copies of the buffers: updating them changes nothing.
    output = F.batch_norm(primal, running_mean, running_var, weight, bias, training, momentum, eps)
    dims = [0, *range(2, primal.dim())]
    return _with_tangent(output, _channel_scaled(_normalization_tangent(primal, tangent, dims, eps), weight))


def _instance_norm(
    input, running_mean=None, running_var=None, weight=None, bias=None,
    use_input_stats=True, momentum=0.1, eps=1e-5,
) -> Tensor:
    primal, tangent = forward_ad.unpack_dual(input)
    arguments = (running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if tangent is None or not use_input_stats:
        return F.instance_norm(input, *arguments)
    output = F.instance_norm(primal, *arguments)
    dims = list(range(2, primal.dim()))
    return _with_tangent(output, _channel_scaled(_normalization_tangent(primal, tangent, dims, eps), weight))


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5) -> Tensor:
    primal, tangent = forward_ad.unpack_dual(input)
    if tangent is None:
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    output = F.layer_norm(primal, normalized_shape, weight, bias, eps)
    dims = list(range(primal.dim() - len(normalized_shape), primal.dim()))
    output_tangent = _normalization_tangent(primal, tangent, dims, eps)
    return _with_tangent(output, output_tangent if weight is None else output_tangent * weight)


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5) -> Tensor:
    primal, tangent = forward_ad.unpack_dual(input)
    if tangent is None:
        return F.group_norm(input, num_groups, weight, bias, eps)
    output = F.group_norm(primal, num_groups, weight, bias, eps)
    grouped = (primal.reshape(primal.shape[0], num_groups, -1), tangent.reshape(primal.shape[0], num_groups, -1))
    output_tangent = _normalization_tangent(*grouped, [-1], eps).reshape(primal.shape)
    return _with_tangent(output, _channel_scaled(output_tangent, weight))


def _softmax(input: Tensor, dim: Optional[int], dtype: Optional[torch.dtype] = None, _stacklevel: int = 3) -> Tensor:
    if dim is None:  # the legacy implicit dimension of F.softmax and nn.Softmax()
        dim = F._get_softmax_dim("softmax", input.dim(), _stacklevel)
    primal, tangent = forward_ad.unpack_dual(input if dtype is None else input.to(dtype))
    output = torch.softmax(primal, dim)
    if tangent is None:
        return output
    return _with_tangent(output, output * (tangent - (output * tangent).sum(dim, keepdim=True)))


def _log_softmax(input: Tensor, dim: Optional[int], dtype: Optional[torch.dtype] = None, _stacklevel: int = 3) -> Tensor:
    if dim is None:
        dim = F._get_softmax_dim("log_softmax", input.dim(), _stacklevel)
    primal, tangent = forward_ad.unpack_dual(input if dtype is None else input.to(dtype))
    output = torch.log_softmax(primal, dim)
    if tangent is None:
        return output
    return _with_tangent(output, tangent - (output.exp() * tangent).sum(dim, keepdim=True))


def _logsumexp(input: Tensor, dim, keepdim: bool = False) -> Tensor:
    primal, tangent = forward_ad.unpack_dual(input)
    output = torch.logsumexp(primal, dim, keepdim)
    if tangent is None:
        return output
    # exp(x - logsumexp(x)) is the softmax over ``dim``, one or several dimensions.
    weights = (primal - torch.logsumexp(primal, dim, keepdim=True)).exp()
    return _with_tangent(output, (weights * tangent).sum(dim, keepdim=keepdim))


def _attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
) -> Tensor:
    """Scaled dot-product attention as matrix products and the softmax above."""
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


def _refuse_multi_head_attention(*args, **kwargs):
    raise NotImplementedError(
        "method='forward_mode' does not run nn.MultiheadAttention (PyTorch's fused "
        "multi-head attention hides its softmax from GradMask); use method='exact' "
        "with the math attention kernel: with torch.nn.attention.sdpa_kernel("
        "torch.nn.attention.SDPBackend.MATH): ..."
    )


# torch.* spellings of the same operations, with their own argument orders.
def _torch_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True):
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _torch_instance_norm(
    input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled=True
):
    return _instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def _torch_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return _layer_norm(input, normalized_shape, weight, bias, eps)


# nn.functional spellings, which take a _stacklevel for the implicit-dim warning.
def _functional_softmax(input, dim=None, _stacklevel=3, dtype=None):
    return _softmax(input, dim, dtype, _stacklevel + 1)


def _functional_softmin(input, dim=None, _stacklevel=3, dtype=None):
    return _softmax(-input, dim, dtype, _stacklevel + 1)


def _functional_log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    return _log_softmax(input, dim, dtype, _stacklevel + 1)


_RECOMPOSED = {
    F.batch_norm: _batch_norm,
    torch.batch_norm: _torch_batch_norm,
    F.instance_norm: _instance_norm,
    torch.instance_norm: _torch_instance_norm,
    F.layer_norm: _layer_norm,
    torch.layer_norm: _torch_layer_norm,
    F.group_norm: _group_norm,
    F.softmax: _functional_softmax,
    F.softmin: _functional_softmin,
    torch.softmax: _softmax,
    torch.special.softmax: _softmax,
    Tensor.softmax: _softmax,
    F.log_softmax: _functional_log_softmax,
    torch.log_softmax: _log_softmax,
    torch.special.log_softmax: _log_softmax,
    Tensor.log_softmax: _log_softmax,
    torch.logsumexp: _logsumexp,
    Tensor.logsumexp: _logsumexp,
    F.scaled_dot_product_attention: _attention,
    F.multi_head_attention_forward: _refuse_multi_head_attention,
}


class recomposed_for_forward_mode(TorchFunctionMode):
    """Within this context the operations above run as written here."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _RECOMPOSED.get(func, func)(*args, **(kwargs or {}))
