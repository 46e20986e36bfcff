"""Reproduce gloo aborting a finished process at interpreter exit, and check the cure (lora_cli/cli.py, entry).

    .venv/bin/python scripts/repro_gloo_exit.py [--mode plain|destroy|exit] [--launches 30]

Each launch is `torchrun --nproc_per_node 4` of this file as a worker: a gloo DDP model takes 5
steps, the ranks swap an object and meet at a barrier, then each ends as --mode says: `plain`
(the interpreter's normal exit), `destroy` (destroy_process_group first) or `exit` (flush, then
os._exit(0), as `lora` ends a launched process). Prints how many launches failed, and how many of
those with "terminate called without an active exception" (the SIGABRT seen in CI).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def worker(mode: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        model(torch.randn(8, 64)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": dist.get_rank()})
    dist.barrier()
    if mode == "destroy":
        dist.destroy_process_group()
    if mode == "exit":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["plain", "destroy", "exit"], default="plain")
    parser.add_argument("--launches", type=int, default=30)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.mode)
        return
    torchrun = Path(sys.executable).with_name("torchrun")
    failed = aborted = 0
    for i in range(args.launches):
        done = subprocess.run([str(torchrun), "--nproc_per_node", "4", "--master_port", str(29600 + i % 50),
                               __file__, "--worker", "--mode", args.mode], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        failed += done.returncode != 0
        aborted += "terminate called without an active exception" in done.stdout + done.stderr
    print(f"{args.mode}: {failed} of {args.launches} launches failed ({aborted} with the gloo abort at exit)")


if __name__ == "__main__":
    main()
