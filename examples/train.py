"""A small real training job: DistributedDataParallel over gloo on CPU.

Works under `dslaunch`, `deepspeed` and `torchrun` alike: the process group comes from the
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); `--local_rank`/`--local-rank` is
accepted and ignored. Each rank trains on its own shard of a fixed synthetic regression problem,
prints its loss, and at the end every rank checks that all ranks hold identical parameters.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--lr', type=float, default=0.1)
    args = parser.parse_args()

    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)

    gen = torch.Generator().manual_seed(1234 + rank)  # a different data shard per rank
    true_w = torch.arange(8, dtype=torch.float32).unsqueeze(1) / 8
    for step in range(args.steps):
        x = torch.randn(32, 8, generator=gen)
        y = x @ true_w + 0.5
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f'rank {rank}/{world} step {step} loss {loss.item():.4f}', flush=True)

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    print(f'rank {rank}: parameters identical on all {world} ranks: {same} '
          f'(LOCAL_RANK={os.environ.get("LOCAL_RANK")}, --local_rank={args.local_rank})', flush=True)
    # Drop the DDP model first: it keeps the process group alive past destroy_process_group(), and
    # gloo's worker thread could then free a finished collective during interpreter shutdown.
    del model, opt
    dist.barrier()  # no rank tears gloo down while a peer still finishes its last collective
    dist.destroy_process_group()
    return 0 if same else 1


if __name__ == '__main__':
    sys.exit(main())
