"""Two gloo processes reaching a new key of the measured 'auto' together: rank 0 measures (with a
timer that makes 'aten' fastest), rank 1 must not measure (its timer would make 'torch' fastest)
and must adopt rank 0's choice. Run by test_registry.py as ``python tune_dist_worker.py OUT.json``
with RESNET_KERNELS_CACHE_DIR set; writes every rank's (decision, how, timer calls) to OUT."""

import json
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _worker(rank: int, port: int, out: str) -> None:
    import resnet_kernels as rk
    from resnet_kernels import _tune

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    calls = []

    def timer(fn, device):
        impl = fn.__defaults__[0].backend  # _tune._measure binds the implementation as a default
        calls.append(impl)
        fn()
        fast = "aten" if rank == 0 else "torch"
        return 1.0 if impl == fast else 2.0

    g = torch.Generator().manual_seed(0)
    x, i = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    s, b = torch.rand(3, generator=g), torch.randn(3, generator=g)
    with _tune.testing(timer=timer, devices=("cpu",)):
        with _tune.recording() as decisions:
            y = rk.bn_add_relu(x, s, b, i)
    ok = bool(torch.allclose(y, torch.relu(x * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1) + i)))
    mine = {"rank": rank, "impl": decisions[0].impl, "how": decisions[0].how, "timer_calls": calls, "ok": ok}
    every = [None] * WORLD
    dist.all_gather_object(every, mine)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(every, f)
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


def main() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_worker, args=(port, sys.argv[1]), nprocs=WORLD, start_method="spawn", join=True)


if __name__ == "__main__":
    main()
