"""A complete trainer that survives preemption: run it, kill it at any moment, run it again.

    python examples/train.py --ckpt runs/example --steps 200
    torchrun --nproc_per_node=2 examples/train.py --ckpt runs/example2 --steps 200   # FSDP2, gloo

Each run continues from the newest complete checkpoint, bit-exactly as if it had never stopped.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchdata.stateful_dataloader import StatefulDataLoader

from ckptguard import CheckpointManager
from ckptguard.demo import TinyLM, TokenWindows, build_optimizer, make_dataset, warmup_cosine

p = argparse.ArgumentParser()
p.add_argument("--ckpt", default="runs/example")
p.add_argument("--steps", type=int, default=200)
p.add_argument("--save-every", type=int, default=25)
args = p.parse_args()

world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)

data_path = os.path.join(args.ckpt, "tokens.npy")
if rank == 0 and not os.path.exists(data_path):
    os.makedirs(args.ckpt, exist_ok=True)
    make_dataset(data_path)
if world > 1:
    dist.barrier()

loader = StatefulDataLoader(TokenWindows(data_path, rank, world), batch_size=16, shuffle=True, drop_last=True)
model = TinyLM()
if world > 1:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
optimizer = build_optimizer(model)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps))

mgr = CheckpointManager(
    args.ckpt, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader, keep_last=3
)
step = mgr.load()  # 0 on the first run; the newest complete checkpoint afterwards
model.train()
while step < args.steps:
    for x, y in loader:
        step += 1
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        mgr.record(step, loss=loss, batch=(x, y))  # run trace: `ckptguard audit` explains a resume
        if rank == 0 and step % 10 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}")
        if step % args.save_every == 0:
            mgr.save(step, blocking=False)  # returns once the state is snapshotted
        if step >= args.steps:
            break
mgr.close()  # finishes the pending async save
if world > 1:
    dist.destroy_process_group()
