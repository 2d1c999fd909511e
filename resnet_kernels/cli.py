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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnet-kernels", description="Fused CUDA/Triton kernels for ResNet.")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="versions, the CUDA extension build, GPUs and usable backends")
    pi.add_argument("--json", action="store_true", help="print JSON instead of text")
    pi.set_defaults(func=_cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
