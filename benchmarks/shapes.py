"""Layer shapes of torchvision's ResNet-18/34/50 at a 224x224 input (the architecture the
package's models reproduce), computed from the architecture rather than listed by hand."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

BLOCKS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
          "resnet50": ("bottleneck", (3, 4, 6, 3))}
SHORT = {"resnet18": "r18", "resnet34": "r34", "resnet50": "r50"}


@dataclass
class Conv:
    cin: int
    cout: int
    k: int
    stride: int
    pad: int
    h: int  # input height == width
    where: List[str] = field(default_factory=list)  # every layer using this shape

    @property
    def key(self) -> Tuple[int, ...]:
        return (self.cin, self.cout, self.k, self.stride, self.pad, self.h)

    @property
    def oh(self) -> int:
        return (self.h + 2 * self.pad - self.k) // self.stride + 1

    @property
    def name(self) -> str:
        return f"{self.where[0]} {self.cin}->{self.cout} {self.k}x{self.k} s{self.stride} @{self.h}"

    @property
    def id(self) -> str:
        """A stable pytest id (no spaces)."""
        return f"{self.where[0]}-{self.cin}to{self.cout}-k{self.k}s{self.stride}-h{self.h}"

    def flops(self, n: int) -> float:
        return 2.0 * n * self.oh * self.oh * self.cout * self.cin * self.k * self.k


def resnet_convs(arch: str, image: int = 224) -> List[Conv]:
    """Every distinct convolution of ``arch`` (first-appearance order)."""
    kind, layers = BLOCKS[arch]
    p = SHORT[arch]
    found: Dict[Tuple[int, ...], Conv] = {}

    def add(where, cin, cout, k, s, pad, h):
        c = Conv(cin, cout, k, s, pad, h)
        found.setdefault(c.key, c).where.append(f"{p}.{where}")

    add("conv1", 3, 64, 7, 2, 3, image)
    h = image // 4  # after the stride-2 stem and the stride-2 max-pool
    inplanes = 64
    exp = 4 if kind == "bottleneck" else 1
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        stride = 1 if li == 1 else 2
        for b in range(n):
            s = stride if b == 0 else 1
            name = f"layer{li}.{b}"
            if kind == "basic":
                add(f"{name}.conv1", inplanes, planes, 3, s, 1, h)
                add(f"{name}.conv2", planes, planes, 3, 1, 1, h // s)
            else:  # torchvision v1.5: the stride is on the 3x3 conv
                add(f"{name}.conv1", inplanes, planes, 1, 1, 0, h)
                add(f"{name}.conv2", planes, planes, 3, s, 1, h)
                add(f"{name}.conv3", planes, planes * exp, 1, 1, 0, h // s)
            if b == 0 and (s != 1 or inplanes != planes * exp):
                add(f"{name}.downsample.0", inplanes, planes * exp, 1, s, 0, h)
            inplanes = planes * exp
            h //= s
    return list(found.values())


def distinct_convs(archs=("resnet18", "resnet50"), image: int = 224) -> List[Conv]:
    """The distinct convolutions over several architectures (merged 'where' lists)."""
    merged: Dict[Tuple[int, ...], Conv] = {}
    for a in archs:
        for c in resnet_convs(a, image):
            if c.key in merged:
                merged[c.key].where.extend(c.where)
            else:
                merged[c.key] = c
    return list(merged.values())


def residual_shapes(n: int = 256, image: int = 224) -> List[Tuple[str, Tuple[int, int, int, int]]]:
    """ResNet-50 block outputs (where the residual add + ReLU runs): (name, NCHW shape)."""
    h = image // 4
    out = []
    for li, planes in enumerate((64, 128, 256, 512), start=1):
        h = h if li == 1 else h // 2
        out.append((f"r50.layer{li}", (n, planes * 4, h, h)))
    return out
