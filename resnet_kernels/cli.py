"""The ``resnet-kernels`` command (also ``python -m resnet_kernels``)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from . import _info

    d = _info.info()
    print(json.dumps(d, indent=2) if args.json else _info.format_info(d))
    return 0


def _cmd_count(args) -> int:
    from . import count

    try:
        counts = [count.count_step(args.model, args.mode, b, batch=args.batch, image_size=args.image_size,
                                   dtype=args.dtype, layout=args.layout, num_classes=args.num_classes)
                  for b in args.backends]
    except (ValueError, NotImplementedError) as exc:
        print(f"resnet-kernels count: error: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(count.to_json(counts))
        return 0
    print(count.format_counts(counts))
    if args.ops:
        for c in counts:
            print()
            print(count.format_ops(c))
    if args.json:
        with open(args.json, "w") as f:
            f.write(count.to_json(counts) + "\n")
    return 0


def _csv(choices):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}, got {text!r}")
        return items
    return parse


def _cmd_bench(args) -> int:
    from . import bench

    try:
        if args.plot:
            bench.require_matplotlib()  # fail before spending minutes on the run
        cfg = bench.make_config(model=args.model, mode=args.mode, batch=args.batch, image_size=args.image_size,
                                dtype=args.dtype, layout=args.layout, backends=args.backends, iters=args.iters,
                                warmup=args.warmup, num_classes=args.num_classes)
        given = dict(batch=args.batch, image_size=args.image_size, dtype=args.dtype, iters=args.iters,
                     warmup=args.warmup)
        res = bench.run_bench(cfg, progress=None if args.quiet else sys.stderr,
                              notes=bench.defaulted_notes(cfg, given))
    except bench.BenchError as exc:
        print(f"resnet-kernels bench: error: {exc}", file=sys.stderr)
        return 2
    print(bench.format_table(res))
    if args.json:
        bench.write_json(res, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        try:
            bench.plot(res, args.plot)
        except bench.BenchError as exc:
            print(f"resnet-kernels bench: error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}")
    return 1 if bench.failed(res) else 0


def _cmd_tune(args) -> int:
    import torch

    from . import _tune, models
    from .bench import DTYPES
    from .tune import tune_model

    if not torch.cuda.is_available():
        print("resnet-kernels tune: needs a CUDA GPU: 'auto' measures implementations only on CUDA tensors. On CPU "
              "tensors it uses aten (PyTorch's own kernels); there is nothing to tune here.", file=sys.stderr)
        return 1
    if args.batch < 1 or args.image_size < 32 or (args.mode == "train" and args.batch < 2):
        print("resnet-kernels tune: error: --batch must be >= 1 (>= 2 for --mode train) and --image-size >= 32",
              file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    mf = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    model = getattr(models, args.model)(num_classes=args.num_classes).cuda().to(dtype=dtype, memory_format=mf)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device="cuda", dtype=dtype)
    images = images.contiguous(memory_format=mf)
    print(f"tuning {args.model} {args.mode} batch {args.batch} {args.image_size}x{args.image_size} {args.dtype} "
          f"{args.layout} on {torch.cuda.get_device_name()} (cache: {_tune.cache_path()})", file=sys.stderr)
    exp = tune_model(model, images, args.mode, progress=None if args.quiet else sys.stderr)
    print(exp.table(times=True))
    print(f"choices cached in {_tune.cache_path()}")
    return 0


def _check_dtypes(text: str):
    from .check import DTYPE_NAMES

    items = [t.strip() for t in text.split(",") if t.strip()]
    if "fp64" in items or "float64" in items:
        raise argparse.ArgumentTypeError(
            "fp64 is not a check dtype: the reference itself runs in float64 (the float64 paths are covered by "
            f"the test suite's gradcheck); choose from {','.join(DTYPE_NAMES)}")
    return _csv(tuple(DTYPE_NAMES))(text)


def _cmd_check(args) -> int:
    from .check import main_check

    return main_check(args)


def _step_args(p, models, *, mode_help="train: forward+loss+backward+SGD step; infer: eval forward", batch=256,
               image_size=224, dtype="bf16", num_classes=True) -> None:
    """The model-step options bench, tune and count share (None: filled in by the command)."""
    from .bench import DTYPES, LAYOUTS, MODES

    p.add_argument("--model", choices=models, default="resnet50")
    p.add_argument("--mode", choices=MODES, default="train", help=mode_help)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--image-size", type=int, default=image_size)
    p.add_argument("--dtype", choices=tuple(DTYPES), default=dtype)
    p.add_argument("--layout", choices=LAYOUTS, default="channels_last")
    if num_classes:
        p.add_argument("--num-classes", type=int, default=1000)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="resnet-kernels", description="Fused CUDA/Triton kernels for ResNet.")
    p.add_argument("--version", action="version", version=f"resnet-kernels {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="versions, the CUDA extension build, GPUs and usable backends")
    pi.add_argument("--json", action="store_true", help="print JSON instead of text")
    pi.set_defaults(func=_cmd_info)

    from .bench import ARCHS, BACKENDS, CPU_DEFAULTS, GPU_DEFAULTS

    pb = sub.add_parser(
        "bench", help="whole-model images/s: fused kernels vs PyTorch eager vs torch.compile",
        description="Times a ResNet train step or inference for each backend in one run (median over timed "
                    "iterations after warm-up; CUDA events on a GPU). Without a GPU: a small CPU comparison "
                    "(wall clock) of the eager and torch backends. Unset sizes default to batch 256, 224px, bf16, "
                    "50 iterations, 10 warm-up on a GPU and batch 2, 64px, fp32, 5 iterations, 1 warm-up on a CPU.")
    _step_args(pb, ARCHS, batch=None, image_size=None, dtype=None, num_classes=False)
    pb.add_argument("--backends", type=_csv(BACKENDS), default=None,
                    help=f"comma-separated subset of {','.join(BACKENDS)} (default: {','.join(GPU_DEFAULTS['backends'])} "
                         f"on a GPU; {','.join(CPU_DEFAULTS['backends'])} on a CPU, where the backends that cannot run "
                         "on CPU tensors are listed as unavailable)")
    pb.add_argument("--iters", type=int, default=None, help="timed iterations")
    pb.add_argument("--warmup", type=int, default=None, help="untimed iterations first (>= 1)")
    pb.add_argument("--num-classes", type=int, default=1000)
    pb.add_argument("--json", metavar="PATH", help="write the results as JSON (schema resnet-kernels-bench/1)")
    pb.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    pb.add_argument("--quiet", action="store_true", help="no progress output")
    pb.set_defaults(func=_cmd_bench)

    pt = sub.add_parser(
        "tune", help="measure and verify every implementation for each layer of a model; cache the choices",
        description="Runs one step of the model on the GPU with backend 'auto' so that every fused layer shape is "
                    "measured (CUDA events) and verified against the reference; prints a per-layer table (each "
                    "implementation's time or failure, the choice, speed-up over aten/cuDNN) and writes the cache "
                    "that later runs (and every rank of a distributed job) reuse. Needs a CUDA GPU.")
    _step_args(pt, ARCHS, mode_help="train: forward and backward ops; infer: eval forward")
    pt.add_argument("--quiet", action="store_true", help="no progress bar")
    pt.set_defaults(func=_cmd_tune)

    from .count import MODELS as COUNT_MODELS, count_backends

    pk = sub.add_parser(
        "count", help="kernel launches and HBM bytes per step, per layer, counted without a GPU (not timed)",
        description="Runs one step of the model on the meta device (no memory, no kernel runs) under a dispatch "
                    "counter: every aten op counts the kernels PyTorch launches for it on CUDA and the bytes its "
                    "tensors occupy; every fused op counts what its implementation declares (Impl.cost). Prints "
                    "launches / GB per layer and in total for each backend. Rules and limits: docs/COUNT.md.")
    _step_args(pk, COUNT_MODELS)
    pk.add_argument("--backends", type=_csv(count_backends()), default=list(count_backends()),
                    help=f"comma-separated subset of {','.join(count_backends())} (default: all)")
    pk.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="print JSON (schema resnet-kernels-count/1) instead of the table, or also write it to PATH")
    pk.add_argument("--ops", action="store_true", help="also print each backend's launches and bytes per op")
    pk.set_defaults(func=_cmd_count)

    pc = sub.add_parser(
        "check", help="parity self-test of every available backend against the PyTorch reference",
        description="Runs add_relu, bn_add_relu, conv_bn_act, conv_bn_add_act (and a small resnet18 when the "
                    "models package is installed) forward and backward on every backend usable here, compares "
                    "with float64 PyTorch layers, prints a pass/fail table; exit status 1 on any failure. "
                    "Unavailable backends are listed with the reason (not a failure).")
    from ._registry import backend_names

    pc.add_argument("--backends", help=f"comma-separated subset of {','.join(backend_names())} (default: all)")
    pc.add_argument("--dtypes", type=_check_dtypes,
                    help="comma-separated subset of fp32,fp16,bf16 (default: fp32,bf16 on a GPU, fp32 on a CPU; "
                         "the reference always runs in float64)")
    pc.add_argument("--cases", help="comma-separated case names (default: all)")
    g = pc.add_mutually_exclusive_group()
    g.add_argument("--model", dest="model", action="store_true", default=None, help="include the resnet18 cases")
    g.add_argument("--no-model", dest="model", action="store_false", help="skip the resnet18 cases")
    pc.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    pc.add_argument("--verbose", "-v", action="store_true", help="print each case as it starts")
    pc.set_defaults(func=_cmd_check)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
