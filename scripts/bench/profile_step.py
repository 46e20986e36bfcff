"""Where a `lora train` step goes: torch.profiler over steady-state steps of the real job.

    .venv/bin/python scripts/bench/profile_step.py [RECIPE] [key=value ...] [--warmup 3]
                                                   [--steps 3] [--rows 25]
                                                   [--out build/bench/profile_step.json]

Runs `lora train` itself in this process (the quickstart recipe by default: SmolLM2-135M-Instruct,
LoRA r16 on all linear layers, packed rows of 160 tokens, batch 4), with tcmalloc and 2 threads as
`lora train` runs, and records --steps optimizer steps after --warmup unprofiled ones. Prints:

- the step split into forward, backward and optimizer (wall time of each phase, from the
  profiler's top-level events: `autograd::engine::evaluate_function` for backward, `Optimizer.step`
  for the optimizer, the rest of the step for forward, loss and bookkeeping);
- the ops by self CPU time, with their share of the profiled steps, and the share of the step
  spent in matrix multiplication against everything else (casts, elementwise, attention).

The run directory goes to build/bench/profile-run (overwritten). Not a timing of `lora train`:
the profiler adds its own overhead (a few percent here); use scripts/bench/training.py for speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

WORK = ROOT / "build" / "bench"
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}
ATTENTION_PREFIXES = ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_flash_attention")


def profiled_training(argv: list[str], warmup: int, steps: int):
    """Run `lora train ARGV` here with a profiler stepped by a Trainer callback; return it and the
    wall time of each profiled step."""
    import torch
    import transformers

    from lora_cli import cli

    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        schedule=torch.profiler.schedule(wait=warmup, warmup=0, active=steps, repeat=1),
    )
    step_seconds: list[float] = []

    class StepProfiler(transformers.TrainerCallback):
        started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if warmup < state.global_step <= warmup + steps:
                step_seconds.append(time.perf_counter() - self.started)
            profiler.step()

    real_train = transformers.Trainer.train

    def train_with_profiler(self, *args, **kwargs):
        self.add_callback(StepProfiler())
        with profiler:
            return real_train(self, *args, **kwargs)

    transformers.Trainer.train = train_with_profiler
    sys.argv = ["lora", "train", *argv]
    try:
        cli.main()
    except SystemExit as done:
        if done.code:
            raise
    finally:
        transformers.Trainer.train = real_train
    return profiler, step_seconds


def phases(profiler, steps: int) -> dict:
    """Seconds per step in backward and in the optimizer, from top-level events."""
    backward = optimizer = 0.0
    for event in profiler.events():
        parent = event.cpu_parent
        if parent is not None and not parent.name.startswith("ProfilerStep"):  # not top-level in its step
            continue
        if event.name.startswith("autograd::engine::evaluate_function"):
            backward += event.cpu_time_total
        elif event.name.startswith("Optimizer.step"):
            optimizer += event.cpu_time_total
    return {"backward": backward / 1e6 / steps, "optimizer": optimizer / 1e6 / steps}


def op_table(profiler, steps: int, step_s: float, rows: int) -> tuple[list[dict], dict]:
    averages = sorted(profiler.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)
    total = sum(a.self_cpu_time_total for a in averages)
    table = [
        {"op": a.key, "calls_per_step": a.count / steps, "self_ms_per_step": a.self_cpu_time_total / 1e3 / steps,
         "share": a.self_cpu_time_total / total}
        for a in averages[:rows]
    ]
    matmul = sum(a.self_cpu_time_total for a in averages if a.key in MATMUL_OPS)
    attention = sum(a.self_cpu_time_total for a in averages if a.key.startswith(ATTENTION_PREFIXES))
    groups = {"matmul": matmul / total, "attention": attention / total,
              "other": 1 - (matmul + attention) / total, "profiled_s_per_step": total / 1e6 / steps,
              "step_s": step_s}
    return table, groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the profiled ones")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--rows", type=int, default=25, help="ops listed")
    parser.add_argument("--out", type=Path, default=WORK / "profile_step.json")
    args = parser.parse_args()
    from lora_cli.allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc(sys.argv)  # as `lora train` runs
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    data = ROOT / "data" / "devils-dictionary"
    run_dir = WORK / "profile-run"
    argv = [args.recipe, f"data.train={data / 'train.jsonl'}", f"data.validation={data / 'test.jsonl'}",
            *args.overrides, f"train.max_steps={args.warmup + args.steps}", "train.log_every=1",
            f"output_dir={run_dir}", "--overwrite"]
    profiler, step_seconds = profiled_training(argv, args.warmup, args.steps)
    step_s = sum(step_seconds) / len(step_seconds)
    split = phases(profiler, args.steps)
    split["forward_and_rest"] = step_s - split["backward"] - split["optimizer"]
    table, groups = op_table(profiler, args.steps, step_s, args.rows)

    print(f"\n{args.steps} profiled steps after {args.warmup}: {step_s:.2f} s per step (with the profiler's overhead)")
    for phase in ("forward_and_rest", "backward", "optimizer"):
        print(f"  {phase:<17} {split[phase]:6.2f} s  {split[phase] / step_s:6.1%}")
    print(f"self CPU time: matmul {groups['matmul']:.1%}, attention {groups['attention']:.1%}, "
          f"everything else {groups['other']:.1%}")
    print(f"\n{'op':<48} {'calls/step':>10} {'ms/step':>9} {'share':>7}")
    for row in table:
        print(f"{row['op'][:48]:<48} {row['calls_per_step']:10.0f} {row['self_ms_per_step']:9.1f} {row['share']:7.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"recipe": args.recipe, "overrides": args.overrides, "warmup": args.warmup, "steps": args.steps,
              "threads": torch.get_num_threads(), "allocator": os.environ.get("LORA_ALLOCATOR_ACTIVE", "system"),
              "torch": torch.__version__, "phases_s_per_step": split, "groups": groups, "ops": table}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
