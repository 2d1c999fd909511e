#!/usr/bin/env python
"""Train the source document's ResNet-18 (10 classes) with the fused kernels.

    python examples/train.py                       # scikit-learn digits, fused, 3 epochs (~95-97% val accuracy)
    python examples/train.py --no-fuse             # the same with plain torchvision layers
    python examples/train.py --data DIR --epochs 10 --device cuda --backend triton

Data: scikit-learn's handwritten digits (1797 8x8 grey images shipped with the package, nothing
is downloaded), upsampled to --size (default 32) and repeated to 3 channels; or an image folder
(``DIR/<class>/<image>``, torchvision ImageFolder), resized to --size. 20% is held out.

The one-line change in a training script: ``model = resnet_kernels.fuse(model)`` after building a
torchvision model (or build ``resnet_kernels.models.resnet18(...)`` directly). Everything else
(optimizer, loss, train()/eval(), state_dict checkpoints) stays as it is.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset, random_split

try:
    from tqdm import tqdm
except ImportError:  # a simple text bar instead
    tqdm = None


class _TextBar:
    def __init__(self, iterable, total: int, desc: str, width: int = 30):
        self.iterable, self.total, self.desc, self.width = iterable, total, desc, width
        self.postfix = ""

    def __iter__(self):
        for i, item in enumerate(self.iterable, 1):
            yield item
            done = int(self.width * i / max(self.total, 1))
            sys.stderr.write(f"\r{self.desc} [{'#' * done}{'.' * (self.width - done)}] {i}/{self.total} {self.postfix}")
            sys.stderr.flush()
        sys.stderr.write("\n")

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s


def progress(iterable, total: int, desc: str):
    if tqdm is not None:
        return tqdm(iterable, total=total, desc=desc, leave=False)
    return _TextBar(iterable, total, desc)


def digits_dataset(size: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("train.py: scikit-learn is needed for the default digits data (pip install scikit-learn), "
                 "or pass --data DIR")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0           # N x 1 x 8 x 8, in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).repeat(1, 3, 1, 1)                                        # 3 channels, ~[-1, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    return TensorDataset(x, y), 10


def folder_dataset(root: str, size: int):
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize([0.5] * 3, [0.5] * 3)])
    ds = datasets.ImageFolder(root, transform=tf)
    if len(ds.classes) < 2:
        sys.exit(f"train.py: --data {root}: expected one sub-folder per class, found {len(ds.classes)}")
    return ds, len(ds.classes)


def build_model(num_classes: int, fuse: bool, backend: str | None):
    import resnet_kernels
    try:
        import torchvision
    except ImportError:
        torchvision = None
    if torchvision is not None:
        model = torchvision.models.resnet18(num_classes=num_classes)   # an existing training script's model...
        if fuse:
            model, report = resnet_kernels.fuse(model, backend=backend, report=True)   # ...the one-line change
            print(report, file=sys.stderr)
    else:  # without torchvision: the drop-in model itself
        model = resnet_kernels.models.resnet18(num_classes=num_classes, backend=backend)
        if not fuse:
            resnet_kernels.unfuse(model)
    return model


def run_epoch(model, loader, device, opt=None, desc=""):
    train = opt is not None
    model.train(train)
    total, correct, loss_sum = 0, 0, 0.0
    bar = progress(loader, len(loader), desc)
    with torch.set_grad_enabled(train):
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)  # softmax belongs to the loss
            if train:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            total += y.numel()
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * y.numel()
            bar.set_postfix_str(f"loss {loss_sum / total:.3f} acc {correct / total:.3f}")
    return loss_sum / total, correct / total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="image folder (one sub-folder per class); default: scikit-learn digits")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--size", type=int, default=32, help="input resolution (default 32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    from resnet_kernels import BACKENDS

    p.add_argument("--backend", default=None, choices=("auto",) + BACKENDS,
                   help="resnet_kernels backend (default: the one in force: auto)")
    p.add_argument("--no-fuse", action="store_true", help="plain PyTorch layers, for comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    ds, num_classes = folder_dataset(args.data, args.size) if args.data else digits_dataset(args.size)
    n_val = max(1, len(ds) // 5)
    train_ds, val_ds = random_split(ds, [len(ds) - n_val, n_val], generator=torch.Generator().manual_seed(args.seed))
    train_dl = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True)
    val_dl = DataLoader(val_ds, batch_size=256)

    model = build_model(num_classes, not args.no_fuse, args.backend).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * len(train_dl))

    class _Stepper:  # step the LR schedule with every optimizer step
        def zero_grad(self, **kw):
            opt.zero_grad(**kw)

        def step(self):
            opt.step()
            sched.step()

    print(f"ResNet-18, {num_classes} classes, {len(train_ds)} train / {len(val_ds)} val images "
          f"at {args.size}x{args.size}, "
          f"{'plain PyTorch' if args.no_fuse else 'fused'}, device {device}", file=sys.stderr)
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        tl, ta = run_epoch(model, train_dl, device, _Stepper(), desc=f"epoch {epoch}/{args.epochs} train")
        vl, va = run_epoch(model, val_dl, device, desc=f"epoch {epoch}/{args.epochs} val")
        print(f"epoch {epoch}: train loss {tl:.4f} acc {ta:.4f} | val loss {vl:.4f} acc {va:.4f} "
              f"| {time.perf_counter() - t0:.1f}s elapsed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
