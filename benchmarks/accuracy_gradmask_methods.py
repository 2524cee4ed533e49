"""How exact are GradMask's methods? Parameter gradient of the penalty against
method="exact", in float32 and float64, on the networks users train.

For each network, dtype and seed: the relative error (max-abs, relative to exact's
largest entry) and the cosine of the parameter gradient of ``forward_mode`` and
``finite_difference`` against ``exact``, and the finite-difference self-check: how
far its difference quotient is from its exactly known first-order term (the number
its value check compares with ``QUOTIENT_TOLERANCE``). Networks in training mode
(BatchNorm with batch statistics), batch of 2, the contrast saliency; built in
benchmarks/_networks.py, with a smooth tanh CNN for comparison.

    python benchmarks/accuracy_gradmask_methods.py           # about 1 min
    python benchmarks/accuracy_gradmask_methods.py --quick   # 2 networks, 2 seeds
"""

import argparse
import contextlib
import warnings

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import captum_gradmask._directional as directional
from captum_gradmask import gradmask_penalty

from _networks import AttentionNet, batchnorm_cnn, densenet, relu_cnn, resnet

NETWORKS = {
    # name: (builder, input shape of one example)
    "tanh CNN 2-D": (
        lambda: nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1),
                              nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)),
        (1, 48, 48),
    ),
    "ReLU max-pool CNN 2-D": (lambda: relu_cnn(2, width=16), (1, 48, 48)),
    "BatchNorm CNN 2-D": (lambda: batchnorm_cnn(2, width=16), (1, 48, 48)),
    "DenseNet 2-D": (lambda: densenet(2, growth=8, block_layers=(2, 2, 2), init_features=16), (1, 64, 64)),
    "ResNet 3-D": (lambda: resnet(3, widths=(8, 16, 32), blocks=(1, 1, 1)), (1, 32, 32, 32)),
    "attention 2-D": (lambda: AttentionNet(2, width=16, patch=4), (1, 32, 32)),
}
QUICK_NETWORKS = ["tanh CNN 2-D", "BatchNorm CNN 2-D"]


def penalty_gradient(model, images, mask, method):
    """The penalty's parameter gradient, flattened, in float64."""
    torch.manual_seed(0)
    # Flash attention, PyTorch's default on CPU, has no double backward.
    attention = sdpa_kernel(SDPBackend.MATH) if method == "exact" else contextlib.nullcontext()
    with warnings.catch_warnings(), attention:
        warnings.simplefilter("ignore")
        penalty = gradmask_penalty(model, images, mask, method=method).penalty
    gradients = torch.autograd.grad(penalty, list(model.parameters()), allow_unused=True, materialize_grads=True)
    return torch.cat([g.flatten() for g in gradients]).double()


def compare(name, dtype, seed):
    build, shape = NETWORKS[name]
    torch.manual_seed(seed)
    model = build().to(dtype).train()
    images = torch.randn(2, *shape, dtype=dtype)
    mask = torch.zeros(2, 1, *shape[1:], dtype=dtype)
    mask[(slice(None), 0, *[slice(side // 4, 3 * side // 4) for side in shape[1:]])] = 1.0
    disagreements = []
    original_check = directional._warn_if_untrusted
    directional._warn_if_untrusted = lambda quotient, first_order: disagreements.append(
        float((quotient.detach() - first_order).abs() / first_order.abs())
    )
    try:
        exact = penalty_gradient(model, images, mask, "exact")
        row = {}
        for method in ["forward_mode", "finite_difference"]:
            ours = penalty_gradient(model, images, mask, method)
            relative = float((ours - exact).abs().max() / exact.abs().max())
            cosine = float(torch.nn.functional.cosine_similarity(ours, exact, dim=0))
            row[method] = (relative, cosine)
    finally:
        directional._warn_if_untrusted = original_check
    return row, disagreements[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 networks, 2 seeds")
    parser.add_argument("--seeds", type=int, default=None, help="default: 2 with --quick, else 3")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = QUICK_NETWORKS if args.quick else list(NETWORKS)
    seeds = range(args.seeds or (2 if args.quick else 3))
    print("parameter gradient of the GradMask penalty against method='exact' (relative max-abs error, cosine);")
    print("'quotient': finite_difference's quotient against its exact first-order term (relative)")
    print(f"{'network':<22} {'dtype':<8} {'seed':>4}  {'forward_mode':>20}  {'finite_difference':>20}  {'quotient':>9}")
    for name in names:
        for dtype in [torch.float32, torch.float64]:
            for seed in seeds:
                row, disagreement = compare(name, dtype, seed)
                cells = "  ".join(f"{row[m][0]:9.1e} cos {row[m][1]:5.3f}" for m in ["forward_mode", "finite_difference"])
                print(f"{name:<22} {str(dtype).split('.')[1]:<8} {seed:>4}  {cells}  {disagreement:9.1e}")


if __name__ == "__main__":
    main()
