"""Small models and references shared by the tests."""

import copy

import torch
from torch import nn


def small_cnn(in_channels: int = 1, n_classes: int = 2, side: int = 6) -> nn.Module:
    """A smooth (tanh) CNN, so second derivatives are non-zero everywhere."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * side * side, n_classes),
    )


def contrast_reference(model, x, target, contrast):
    """d|z_t - z_c|/dx per example, by float64 autograd on a hand-written objective."""
    x = x.detach().double().requires_grad_()
    logits = copy.deepcopy(model).double()(x)
    rows = torch.arange(x.shape[0])
    difference = (logits[rows, target] - logits[rows, contrast]).abs()
    (gradient,) = torch.autograd.grad(difference.sum(), x)
    return gradient


class ModelState:
    """Snapshot of what a call must not change on a model and its inputs."""

    def __init__(self, model: nn.Module, *tensors: torch.Tensor):
        self.model = model
        self.modes = [m.training for m in model.modules()]
        self.hooks = [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ]
        self.param_flags = [p.requires_grad for p in model.parameters()]
        self.tensors = tensors
        self.tensor_flags = [t.requires_grad for t in tensors]

    def assert_unchanged(self):
        assert [m.training for m in self.model.modules()] == self.modes
        assert [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in self.model.modules()
        ] == self.hooks
        assert [p.requires_grad for p in self.model.parameters()] == self.param_flags
        assert [t.requires_grad for t in self.tensors] == self.tensor_flags
