"""Drop-in replacements for ``torchvision.models.resnet``: same constructors, same architecture,
same submodule names (so the same ``state_dict`` keys), same initialisation, same
``train()``/``eval()`` semantics; the forward passes run through the fused functional API
(:func:`resnet_kernels.functional.conv_bn_act` / :func:`~resnet_kernels.functional.conv_bn_add_act`)
over the blocks' own ``nn.Conv2d``/``nn.BatchNorm2d`` modules.

Every block and the stem decide per (conv, bn) unit, on every forward, whether the unit can be
fused (see ``_units.py``); a unit that cannot (dilation, grouped conv, a ``norm_layer`` other than
``nn.BatchNorm2d``/``nn.SyncBatchNorm`` such as GroupNorm, module hooks) runs the plain PyTorch
modules exactly like torchvision. ``norm_layer=nn.SyncBatchNorm`` (or
``nn.SyncBatchNorm.convert_sync_batchnorm``) gives fused units with cross-process statistics. ``module.fused = False`` (what :func:`resnet_kernels.unfuse`
sets) makes a module run the plain PyTorch path throughout.

torchvision is needed only for ``weights=`` (pretrained weights are fetched by torchvision).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Type, Union

import torch
from torch import Tensor, nn

from .. import _backend, _block
from ..functional import residual_block, unit_act, unit_add_act
from ._units import is_4d, projection_reason, relu_ok, unit_ok
from .._script import no_script
from ..nn.pool import head_pool, stem_pool

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "conv1x1", "conv3x3",
           "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (as torchvision's)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (as torchvision's)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _check_backend(backend: Optional[str]) -> Optional[str]:
    return None if backend is None else _backend._check_name(backend)


# ------------------------------------------------------------------------------------------------
# units shared by the blocks (``blk`` is the block: it provides .backend, .relu, .downsample)
# ------------------------------------------------------------------------------------------------
def _conv_bn_relu(blk: nn.Module, x: Tensor, conv: nn.Module, bn: nn.Module) -> Tensor:
    if unit_ok(x, conv, bn):  # (what conv_bn_act checks of the modules: unit_act skips it)
        return unit_act(x, conv, bn, True, None, blk.backend)
    return blk.relu(bn(conv(x)))


def _conv_bn_add_relu(blk: nn.Module, h: Tensor, conv: nn.Module, bn: nn.Module, x: Tensor) -> Tensor:
    """relu(bn(conv(h)) + shortcut(x)), shortcut = blk.downsample or the identity."""
    ds = blk._modules.get("downsample")  # (blk.downsample: a submodule, or None)
    main = unit_ok(h, conv, bn)
    if main and ds is not None and is_4d(x) and projection_reason(ds) is None:
        # the 1x1 projection's BN, the block's last BN, the add and the ReLU in one pass
        return unit_add_act(h, conv, bn, x, ds[0], ds[1], True, blk.backend)
    shortcut = x if ds is None else ds(x)
    if main:
        return unit_add_act(h, conv, bn, shortcut, None, None, True, blk.backend)
    out = bn(conv(h))
    out += shortcut
    return blk.relu(out)


def _block_train(blk: nn.Module, x: Tensor, units) -> Optional[Tensor]:
    """The whole block as one autograd function (training with batch statistics: the fused
    backward, resnet_kernels/_block.py), or None where the per-unit path runs."""
    # what rules it out for the whole block first (no gradient; a backend whose requests keep the
    # per-op graph: _block.applicable's first checks), before the per-unit checks
    if not torch.is_grad_enabled() or not _block.backend_ok(_backend.op_arg(blk.backend)):
        return None
    ds = blk._modules.get("downsample")
    if not all(unit_ok(x, c, b) for c, b in units):
        return None
    if ds is not None and (not is_4d(x) or projection_reason(ds) is not None):
        return None
    return residual_block(x, units, (ds[0], ds[1]) if ds is not None else None, backend=blk.backend)


# The backends whose stem runs in training as a one-unit block (``_stem_train``): where its
# conv2d_backward computes the stem's wgrad operand (the BatchNorm backward) in the kernel's loads
# (triton; torch: the reference) and 'auto' (counted by its static choice, triton's; measured per call
# on a GPU). Not cuda: its csrc wgrad takes Cin multiples of 8, so for a 3-channel image its
# conv2d_backward is cuDNN's behind separate passes, which counts more than the per-unit stem
# (ResNet-18 train, batch 256, bf16: 100 -> 104 launches, 16.88 -> 18.40 GB; resnet-kernels count).
_STEM_BACKENDS = ("auto", "triton", "torch")


def _stem_train(x: Tensor, conv: nn.Conv2d, bn: nn.Module, backend) -> Optional[Tensor]:
    """The stem's conv + BN + ReLU in training as a one-unit block with nothing added
    (``residual_block(..., add_input=False)``: the BatchNorm's backward computed in the convolution
    backward's operand, its running update in the BatchNorm's forward launch), or None where the
    per-unit path runs."""
    requested = _backend.op_arg(backend)
    if requested not in _STEM_BACKENDS or not torch.is_grad_enabled() or not _block.backend_ok(requested):
        return None
    return residual_block(x, [(conv, bn)], None, backend=requested, add_input=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, + shortcut, ReLU)."""

    expansion: int = 1
    fused: bool = True
    backend: Optional[str] = None

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, backend: Optional[str] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self.fused = True
        self.backend = _check_backend(backend)

    def _forward_plain(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)

    def forward(self, x: Tensor) -> Tensor:
        m = self._modules  # (the submodules without nn.Module.__getattr__'s frame per read)
        if not (self.fused and relu_ok(m.get("relu"))):
            return self._forward_plain(x)
        conv1, bn1, conv2, bn2 = m.get("conv1"), m.get("bn1"), m.get("conv2"), m.get("bn2")
        if torch.is_grad_enabled():  # (_block_train's first condition, before its units are gathered)
            out = _block_train(self, x, ((conv1, bn1), (conv2, bn2)))
            if out is not None:
                return out
        out = _conv_bn_relu(self, x, conv1, bn1)
        return _conv_bn_add_relu(self, out, conv2, bn2, x)

    def extra_repr(self) -> str:
        return f"fused={self.fused}, backend={self.backend!r}"

    __prepare_scriptable__ = no_script


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride is on the 3x3 conv)."""

    expansion: int = 4
    fused: bool = True
    backend: Optional[str] = None

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, backend: Optional[str] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.fused = True
        self.backend = _check_backend(backend)

    def _forward_plain(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)

    def forward(self, x: Tensor) -> Tensor:
        m = self._modules  # (as BasicBlock.forward)
        if not (self.fused and relu_ok(m.get("relu"))):
            return self._forward_plain(x)
        conv1, bn1, conv2, bn2 = m.get("conv1"), m.get("bn1"), m.get("conv2"), m.get("bn2")
        conv3, bn3 = m.get("conv3"), m.get("bn3")
        if torch.is_grad_enabled():
            out = _block_train(self, x, ((conv1, bn1), (conv2, bn2), (conv3, bn3)))
            if out is not None:
                return out
        out = _conv_bn_relu(self, x, conv1, bn1)
        out = _conv_bn_relu(self, out, conv2, bn2)
        return _conv_bn_add_relu(self, out, conv3, bn3, x)

    def extra_repr(self) -> str:
        return f"fused={self.fused}, backend={self.backend!r}"

    __prepare_scriptable__ = no_script


class ResNet(nn.Module):
    """torchvision's ResNet with a fused stem (conv7x7 + BN + ReLU, then the max pool through
    ``resnet_kernels.ops.max_pool2d``: a one-byte argmax instead of int64 indices) and fused blocks."""

    fused: bool = True
    backend: Optional[str] = None

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[List[bool]] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, backend: Optional[str] = None) -> None:
        super().__init__()
        backend = _check_backend(backend)
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None "
                             f"or a 3-element tuple, got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        # torchvision's initialisation, in the same order (same RNG draws for the same seed).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

        self.fused = True
        self.backend = backend
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                m.backend = backend

    def _make_layer(self, block: Type[Union[BasicBlock, Bottleneck]], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation,
                        norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor) -> Tensor:
        if not self.fused:
            return self._forward_plain(x)
        m = self._modules  # (the submodules without nn.Module.__getattr__'s frame per read)
        conv1, bn1, relu = m.get("conv1"), m.get("bn1"), m.get("relu")
        if relu_ok(relu) and unit_ok(x, conv1, bn1):
            y = _stem_train(x, conv1, bn1, self.backend)
            x = y if y is not None else unit_act(x, conv1, bn1, True, None, self.backend)
        else:
            x = relu(bn1(conv1(x)))
        x = stem_pool(m.get("maxpool"), x, self.backend)
        x = m.get("layer1")(x)
        x = m.get("layer2")(x)
        x = m.get("layer3")(x)
        x = m.get("layer4")(x)
        x = head_pool(m.get("avgpool"), x)  # (its backward writes the last block's incoming gradient in the block's layout)
        return m.get("fc")(x)

    def _forward_plain(self, x: Tensor) -> Tensor:
        """torchvision's forward (``fused = False``)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)

    def extra_repr(self) -> str:
        return f"fused={self.fused}, backend={self.backend!r}"

    __prepare_scriptable__ = no_script


# ------------------------------------------------------------------------------------------------
# constructors (torchvision's signatures, plus backend=)
# ------------------------------------------------------------------------------------------------
def _resnet(name: str, weights_enum: str, block, layers, weights: Any, progress: bool, num_classes: int,
            **kwargs: Any) -> ResNet:
    if weights is not None:
        try:
            import torchvision.models as tvm
        except ImportError as e:  # pragma: no cover - torchvision is a test dependency
            raise ImportError(f"{name}(weights=...): pretrained weights are loaded through torchvision, "
                              f"which is not installed (pip install torchvision)") from e
        weights = getattr(tvm, weights_enum).verify(weights)  # enum member or its name; TypeError otherwise
        expected = len(weights.meta["categories"])
        if num_classes != expected:
            raise ValueError(f"The parameter 'num_classes' expected value {expected} but got {num_classes} instead.")
    model = ResNet(block, layers, num_classes=num_classes, **kwargs)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model


def _doc(depth: int, enum: str) -> str:
    return f"""ResNet-{depth}, drop-in for ``torchvision.models.resnet{depth}``.

    weights: None, a ``torchvision.models.{enum}`` member, or its name (e.g. ``"DEFAULT"``,
        ``"IMAGENET1K_V1"``); loaded through torchvision (downloaded on first use).
    progress: show torchvision's download progress bar.
    num_classes, zero_init_residual, groups, width_per_group, replace_stride_with_dilation,
        norm_layer: as torchvision's ResNet.
    backend: None (the backend in force, see ``resnet_kernels.use_backend``), 'auto', 'cuda',
        'triton' or 'torch'; used by every fused unit.
    """


def resnet18(*, weights: Any = None, progress: bool = True, num_classes: int = 1000, zero_init_residual: bool = False,
             groups: int = 1, width_per_group: int = 64, replace_stride_with_dilation: Optional[List[bool]] = None,
             norm_layer: Optional[Callable[..., nn.Module]] = None, backend: Optional[str] = None) -> ResNet:
    return _resnet("resnet18", "ResNet18_Weights", BasicBlock, [2, 2, 2, 2], weights, progress, num_classes,
                   zero_init_residual=zero_init_residual, groups=groups, width_per_group=width_per_group,
                   replace_stride_with_dilation=replace_stride_with_dilation, norm_layer=norm_layer, backend=backend)


def resnet34(*, weights: Any = None, progress: bool = True, num_classes: int = 1000, zero_init_residual: bool = False,
             groups: int = 1, width_per_group: int = 64, replace_stride_with_dilation: Optional[List[bool]] = None,
             norm_layer: Optional[Callable[..., nn.Module]] = None, backend: Optional[str] = None) -> ResNet:
    return _resnet("resnet34", "ResNet34_Weights", BasicBlock, [3, 4, 6, 3], weights, progress, num_classes,
                   zero_init_residual=zero_init_residual, groups=groups, width_per_group=width_per_group,
                   replace_stride_with_dilation=replace_stride_with_dilation, norm_layer=norm_layer, backend=backend)


def resnet50(*, weights: Any = None, progress: bool = True, num_classes: int = 1000, zero_init_residual: bool = False,
             groups: int = 1, width_per_group: int = 64, replace_stride_with_dilation: Optional[List[bool]] = None,
             norm_layer: Optional[Callable[..., nn.Module]] = None, backend: Optional[str] = None) -> ResNet:
    return _resnet("resnet50", "ResNet50_Weights", Bottleneck, [3, 4, 6, 3], weights, progress, num_classes,
                   zero_init_residual=zero_init_residual, groups=groups, width_per_group=width_per_group,
                   replace_stride_with_dilation=replace_stride_with_dilation, norm_layer=norm_layer, backend=backend)


def resnet101(*, weights: Any = None, progress: bool = True, num_classes: int = 1000, zero_init_residual: bool = False,
              groups: int = 1, width_per_group: int = 64, replace_stride_with_dilation: Optional[List[bool]] = None,
              norm_layer: Optional[Callable[..., nn.Module]] = None, backend: Optional[str] = None) -> ResNet:
    return _resnet("resnet101", "ResNet101_Weights", Bottleneck, [3, 4, 23, 3], weights, progress, num_classes,
                   zero_init_residual=zero_init_residual, groups=groups, width_per_group=width_per_group,
                   replace_stride_with_dilation=replace_stride_with_dilation, norm_layer=norm_layer, backend=backend)


def resnet152(*, weights: Any = None, progress: bool = True, num_classes: int = 1000, zero_init_residual: bool = False,
              groups: int = 1, width_per_group: int = 64, replace_stride_with_dilation: Optional[List[bool]] = None,
              norm_layer: Optional[Callable[..., nn.Module]] = None, backend: Optional[str] = None) -> ResNet:
    return _resnet("resnet152", "ResNet152_Weights", Bottleneck, [3, 8, 36, 3], weights, progress, num_classes,
                   zero_init_residual=zero_init_residual, groups=groups, width_per_group=width_per_group,
                   replace_stride_with_dilation=replace_stride_with_dilation, norm_layer=norm_layer, backend=backend)


for _depth, _fn in ((18, resnet18), (34, resnet34), (50, resnet50), (101, resnet101), (152, resnet152)):
    _fn.__doc__ = _doc(_depth, f"ResNet{_depth}_Weights")
del _depth, _fn
