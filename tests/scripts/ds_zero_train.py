"""A DeepSpeed training script as users write them (DeepSpeedExamples' shape): `--local_rank`,
DeepSpeed's own `--deepspeed --deepspeed_config ds.json` arguments, `deepspeed.init_distributed()`
finding the job in the environment, and `deepspeed.initialize()` with ZeRO.

Prints each rank's loss per step and, at the end, its rank variables and a checksum of the full
model's parameters (gathered under ZeRO-3), so that runs under two launchers can be compared.
"""

import argparse
import os
import sys

# The venv's tools on PATH, as in an activated venv, however this rank was started (an ssh session
# on another host has a bare PATH): DeepSpeed compiles its CPU collectives with the venv's ninja.
os.environ['PATH'] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')

import deepspeed
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--local_rank', type=int, default=-1)
    parser.add_argument('--steps', type=int, default=3)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    deepspeed.init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    rank = engine.global_rank
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    for step in range(args.steps):
        x = torch.randn(engine.train_micro_batch_size_per_gpu(), 16, generator=gen)
        loss = torch.nn.functional.mse_loss(engine(x), x.sum(1, keepdim=True))
        engine.backward(loss)
        engine.step()
        print(f'rank {rank} step {step} loss {loss.item():.6f}', flush=True)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        total = sum(p.detach().double().sum().item() for p in params)
    print(f'rank {rank} of {engine.world_size} local_rank {args.local_rank} LOCAL_RANK {os.environ["LOCAL_RANK"]} '
          f'params {total:.6f}', flush=True)
    # Every rank is done with every collective; then leave without the interpreter's teardown, where
    # torch's gloo can abort a rank (std::terminate, SIGABRT: pytorch/pytorch#179291; about 1 run in
    # 10 here, under either launcher), which would hide what these tests compare.
    torch.distributed.barrier()
    os._exit(0)


if __name__ == '__main__':
    main()
