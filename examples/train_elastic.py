"""Elastic training: DistributedDataParallel over gloo on CPU that survives restarts and resizes.

    dslaunch --elastic_training --min_elastic_nodes 1 --max_elastic_nodes 2 \\
        --master_addr HOST0 --master_port 29500 examples/train_elastic.py --checkpoint_dir /shared/ckpt

(or `python -m dslaunch.launch --enable_elastic_training ...` on each node). Every time the elastic
agent starts the ranks (first start, after a rank failure, after nodes joined or left) the script
begins again: rank 0 loads the newest checkpoint from `--checkpoint_dir`, broadcasts the step to
resume from, DDP broadcasts rank 0's weights, and training goes on with the current world size.
Rank 0 writes a checkpoint (atomically) every `--save_every` steps and at the end. The process
group comes from the environment (`init_process_group('gloo')`, env://); there is no `--local_rank`.
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

CHECKPOINT = 'checkpoint.pt'


def load_step(model: torch.nn.Module, ckpt_dir: str) -> int:
    """Rank 0: the step to resume from (0 without a checkpoint), weights loaded into `model`."""
    path = os.path.join(ckpt_dir, CHECKPOINT)
    if not os.path.exists(path):
        return 0
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state['model'])
    return int(state['step'])


def save(model: torch.nn.Module, ckpt_dir: str, step: int) -> None:
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp = os.path.join(ckpt_dir, f'.{CHECKPOINT}.{os.getpid()}')
    torch.save({'model': model.state_dict(), 'step': step}, tmp)
    os.replace(tmp, os.path.join(ckpt_dir, CHECKPOINT))  # readers see the old or the new file, never half


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--checkpoint_dir', default='elastic_checkpoints')
    parser.add_argument('--steps', type=int, default=100)
    parser.add_argument('--save_every', type=int, default=5)
    parser.add_argument('--step_time', type=float, default=0.0, help='extra seconds per step (to watch it run)')
    parser.add_argument('--lr', type=float, default=0.05)
    args = parser.parse_args()

    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    start = torch.zeros(1, dtype=torch.long)
    if rank == 0:
        start[0] = load_step(model, args.checkpoint_dir)
    dist.broadcast(start, src=0)
    first = int(start[0])
    ddp = DistributedDataParallel(model)  # broadcasts rank 0's (possibly restored) weights
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr)
    print(
        f'rank {rank}/{world} start at step {first} (local rank {os.environ.get("LOCAL_RANK")}, '
        f'node {os.environ.get("GROUP_RANK")}/{os.environ.get("GROUP_WORLD_SIZE")}, '
        f'restart {os.environ.get("TORCHELASTIC_RESTART_COUNT")}, pid {os.getpid()})',
        flush=True,
    )

    true_w = torch.arange(8, dtype=torch.float32).unsqueeze(1) / 8
    loss = torch.zeros(())
    for step in range(first, args.steps):
        gen = torch.Generator().manual_seed(step * 1000 + rank)  # a shard per rank, reproducible per step
        x = torch.randn(32, 8, generator=gen)
        y = x @ true_w + 0.5
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.step_time:
            time.sleep(args.step_time)
        if rank == 0 and (step + 1) % args.save_every == 0:
            save(model, args.checkpoint_dir, step + 1)
        if step % 5 == 0:
            print(f'rank {rank}/{world} step {step} loss {loss.item():.4f}', flush=True)

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    if rank == 0:
        save(model, args.checkpoint_dir, args.steps)
    print(
        f'rank {rank}/{world} finished {args.steps} steps, loss {loss.item():.4f}, parameters identical: {same}',
        flush=True,
    )
    # Drop DDP first: it keeps the process group alive past destroy_process_group(), and gloo's
    # worker thread could then free a finished collective during interpreter shutdown (SIGABRT).
    del ddp, opt
    dist.barrier()  # no rank tears gloo down while a peer still finishes its last collective
    dist.destroy_process_group()
    return 0 if same else 1


if __name__ == '__main__':
    sys.exit(main())
