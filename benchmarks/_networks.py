"""Networks of the kinds medical-imaging users train, for 2-D and 3-D inputs: plain
ReLU / max-pool CNNs, BatchNorm CNNs, DenseNet (DenseNet121 at the default sizes),
ResNet (ResNet-18 at the default sizes) and a small attention network (LayerNorm,
softmax attention, GELU). The benchmarks build them at full size, the tests small.
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
GLOBAL_AVG_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def relu_cnn(dims: int, in_channels: int = 1, n_classes: int = 2, width: int = 8) -> nn.Module:
    return nn.Sequential(
        CONV[dims](in_channels, width, 3, padding=1), nn.ReLU(), MAX_POOL[dims](2),
        CONV[dims](width, width, 3, padding=1), nn.ReLU(),
        GLOBAL_AVG_POOL[dims](1), nn.Flatten(), nn.Linear(width, n_classes),
    )


def batchnorm_cnn(dims: int, in_channels: int = 1, n_classes: int = 2, width: int = 8) -> nn.Module:
    return nn.Sequential(
        CONV[dims](in_channels, width, 3, padding=1), BATCH_NORM[dims](width), nn.ReLU(),
        MAX_POOL[dims](2),
        CONV[dims](width, width, 3, padding=1), BATCH_NORM[dims](width), nn.ReLU(),
        GLOBAL_AVG_POOL[dims](1), nn.Flatten(), nn.Linear(width, n_classes),
    )


class _DenseLayer(nn.Module):
    def __init__(self, dims: int, in_channels: int, growth: int, bottleneck: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            BATCH_NORM[dims](in_channels), nn.ReLU(),
            CONV[dims](in_channels, bottleneck * growth, 1, bias=False),
            BATCH_NORM[dims](bottleneck * growth), nn.ReLU(),
            CONV[dims](bottleneck * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layers(x)], dim=1)


def densenet(
    dims: int,
    in_channels: int = 1,
    n_classes: int = 2,
    growth: int = 32,
    block_layers: Sequence[int] = (6, 12, 24, 16),
    init_features: int = 64,
    bottleneck: int = 4,
) -> nn.Module:
    """DenseNet-BC; the defaults are DenseNet121's (MONAI's and torchvision's)."""
    layers = [
        CONV[dims](in_channels, init_features, 7, stride=2, padding=3, bias=False),
        BATCH_NORM[dims](init_features), nn.ReLU(), MAX_POOL[dims](3, stride=2, padding=1),
    ]
    channels = init_features
    for block, n_layers in enumerate(block_layers):
        for _ in range(n_layers):
            layers.append(_DenseLayer(dims, channels, growth, bottleneck))
            channels += growth
        if block < len(block_layers) - 1:
            layers += [
                BATCH_NORM[dims](channels), nn.ReLU(),
                CONV[dims](channels, channels // 2, 1, bias=False), AVG_POOL[dims](2),
            ]
            channels //= 2
    layers += [
        BATCH_NORM[dims](channels), nn.ReLU(), GLOBAL_AVG_POOL[dims](1), nn.Flatten(),
        nn.Linear(channels, n_classes),
    ]
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    def __init__(self, dims: int, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            CONV[dims](in_channels, channels, 3, stride=stride, padding=1, bias=False),
            BATCH_NORM[dims](channels), nn.ReLU(),
            CONV[dims](channels, channels, 3, padding=1, bias=False), BATCH_NORM[dims](channels),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_channels == channels
            else nn.Sequential(
                CONV[dims](in_channels, channels, 1, stride=stride, bias=False),
                BATCH_NORM[dims](channels),
            )
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


def resnet(
    dims: int,
    in_channels: int = 1,
    n_classes: int = 2,
    widths: Sequence[int] = (64, 128, 256, 512),
    blocks: Sequence[int] = (2, 2, 2, 2),
) -> nn.Module:
    """ResNet with basic blocks; the defaults are ResNet-18's."""
    layers = [
        CONV[dims](in_channels, widths[0], 7, stride=2, padding=3, bias=False),
        BATCH_NORM[dims](widths[0]), nn.ReLU(), MAX_POOL[dims](3, stride=2, padding=1),
    ]
    channels = widths[0]
    for stage, (width, n_blocks) in enumerate(zip(widths, blocks)):
        for block in range(n_blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(_BasicBlock(dims, channels, width, stride))
            channels = width
    layers += [GLOBAL_AVG_POOL[dims](1), nn.Flatten(), nn.Linear(channels, n_classes)]
    return nn.Sequential(*layers)


class AttentionNet(nn.Module):
    """Patch embedding, one pre-norm transformer block (LayerNorm, softmax
    self-attention through scaled_dot_product_attention, a GELU MLP), mean pooling."""

    def __init__(self, dims: int, in_channels: int = 1, n_classes: int = 2, width: int = 16, patch: int = 2) -> None:
        super().__init__()
        self.embed = CONV[dims](in_channels, width, patch, stride=patch)
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, n_classes)
        self.heads = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (N, L, width)
        n, length, width = tokens.shape
        qkv = self.qkv(self.attention_norm(tokens)).reshape(n, length, 3, self.heads, -1)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(query, key, value)
        tokens = tokens + attended.transpose(1, 2).reshape(n, length, width)
        tokens = tokens + self.mlp(self.mlp_norm(tokens))
        return self.head(tokens.mean(1))
