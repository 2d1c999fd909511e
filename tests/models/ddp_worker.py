"""DistributedDataParallel (gloo, 2 CPU processes) on a fused resnet18; run by test_ddp.py as
``python ddp_worker.py IN.pt OUT.pt``. IN holds the initial state_dict and the global batches;
each rank trains on its half of every batch; rank 0 writes per-step gradients and the final
parameters and buffers (and whether both ranks ended with identical parameters) to OUT."""

import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
DEADLINE_S = 150


def _worker(rank: int, port: int, inp: str, out: str) -> None:
    import resnet_kernels as rk
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    data = torch.load(inp)
    model = rk.models.resnet18(num_classes=10, backend="torch")
    model.load_state_dict(data["state"], strict=True)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    grads = []
    for x, w in zip(data["batches"], data["weights"]):
        shard = x.chunk(WORLD)[rank]
        wshard = w.chunk(WORLD)[rank]
        opt.zero_grad()
        # mean over the global batch = sum over shards / WORLD; DDP averages gradients over ranks
        loss = (ddp(shard) * wshard).sum() * WORLD
        loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save({"grads": grads, "state": {k: v.clone() for k, v in model.state_dict().items()},
                    "ranks_equal": all(torch.equal(g, gathered[0]) for g in gathered)}, out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    inp, out = sys.argv[1], sys.argv[2]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    ctx = mp.start_processes(_worker, args=(port, inp, out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            print(f"ddp_worker: timed out after {DEADLINE_S}s", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
