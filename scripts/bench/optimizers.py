"""train.optimizer on the real model: `scripts/bench/training.py --optimizers [NAMES]`.

    .venv/bin/python scripts/bench/training.py --optimizers [adamw_torch,adamw_8bit,...]
                                               [--profiles real] [--repeats 1] [--steps N]

Per optimizer, `lora train` on the profile's model and examples (default: `real`, the quickstart's
Devil's Dictionary pairs on SmolLM2-135M-Instruct, all 30 layers; our recipe, model.dtype auto,
LoRA r=16 on all linear layers), each run in a fresh subprocess, interleaved over the repeats:
supervised and non-pad tokens/s (steady state: steps 3 to the end), seconds per step, peak RSS of
the process (and, on a GPU, the peak GPU memory in tensors that `lora train` records), the
optimizer state measured in the last checkpoint (the tensors of optimizer.pt) beside what `lora
estimate` gives for it, and the mean train loss over the last quarter of the steps.
"""

from __future__ import annotations

import json
import shutil
import statistics

NAMES = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_8bit", "lion_8bit", "paged_adamw_8bit")


def state_bytes(path) -> int:
    import torch

    def tensors(value):
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)

    state = torch.load(path, weights_only=False, map_location="cpu")
    return sum(t.numel() * t.element_size() for t in tensors(state["state"]))


def run_one(name: str, profile: str, model, files: dict, env: dict, index: int, steps: int | None) -> dict:
    import training
    import yaml

    out = training.WORK / "runs" / f"optimizers-{profile}-{name}-{index}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    steps = steps or files["ours_steps"]
    spec = {"model": str(model), "train": str(files["train"]), "max_length": training.PROFILES[profile]["max_length"],
            "out": str(out / "run"), "steps": steps, "batch": files["ours_batch"]}
    recipe = training.ours_recipe(spec, "none", "auto")
    recipe["train"].update(optimizer=name, save_every=steps)  # one checkpoint at the end: its optimizer.pt
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    spec["recipe"] = str(out / "recipe.yaml")
    _, rss, launched = training.run_child(training.ours_command(spec), env, out / "stderr.log")
    run = out / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    result = {"peak_rss_gb": rss, **training.step_stats(lines, launched)}
    gpu = json.loads((run / "run.json").read_text())["memory"].get("gpu_peak_allocated_bytes")
    if gpu is not None:
        result["peak_gpu_gb"] = gpu / 1e9
    result["optimizer_state_mb"] = state_bytes(run / "checkpoints" / f"checkpoint-{steps}" / "optimizer.pt") / 1e6
    estimate = training.run_child([*training.lora_command(), "estimate", spec["recipe"], "--json"], env)[0]
    result["estimate_optimizer_mb"] = estimate["memory"]["lora"]["optimizer"] / 1e6
    return result


def run_optimizers(names: list[str], profiles: list[str], repeats: int, steps: int | None, env: dict) -> dict:
    import training

    report = {}
    for profile in profiles:
        model, files = training.prepare_profile(profile)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for i in range(repeats):
            for name in names:
                result = run_one(name, profile, model, files, env, i, steps)
                runs[name].append(result)
                print(f"  {profile} {name} #{i + 1}: {result['tokens_per_s']:.1f} tok/s, "
                      f"{result['peak_rss_gb']:.2f} GB RSS, optimizer state {result['optimizer_state_mb']:.2f} MB",
                      flush=True)
        summary = {}
        for name, results in runs.items():
            keys = [k for k, v in results[0].items() if isinstance(v, (int, float))]
            summary[name] = {k: statistics.median(r[k] for r in results) for k in keys}
            for peak in ("peak_rss_gb", "peak_gpu_gb"):
                if peak in results[0]:
                    summary[name][peak] = max(r[peak] for r in results)
        print_table(profile, summary)
        report[profile] = {"summary": summary, "runs": runs}
    return report


def print_table(profile: str, summary: dict) -> None:
    base = summary.get("adamw_torch") or next(iter(summary.values()))
    gpu = "peak_gpu_gb" in base
    print(f"\n== optimizers, {profile} ==  (medians of the repeats; peak memory: max; x: against adamw_torch)")
    print(f"{'optimizer':18} {'sup tok/s':>9} {'tok/s':>7} {'x':>5} {'s/step':>6} {'RSS GB':>6} "
          + (f"{'GPU GB':>6} " if gpu else "") + f"{'state MB':>8} {'estimate':>8} {'loss (last 1/4)':>15}")
    for name, s in summary.items():
        print(f"{name:18} {s['supervised_tokens_per_s']:9.1f} {s['tokens_per_s']:7.1f} "
              f"{s['tokens_per_s'] / base['tokens_per_s']:5.2f} {s['seconds_per_step']:6.2f} {s['peak_rss_gb']:6.2f} "
              + (f"{s['peak_gpu_gb']:6.2f} " if gpu else "")
              + f"{s['optimizer_state_mb']:8.2f} {s['estimate_optimizer_mb']:8.2f} "
              f"{s['train_loss_last_quarter']:15.3f}")
