"""`lora train` at another git revision against the working tree: same recipe, same machine, same
virtualenv, interleaved runs. For a change that must not change behaviour or speed (a refactor).

    .venv/bin/python scripts/bench/compare_revisions.py --base REV [--recipe configs/quickstart.yaml]
                     [--steps 15] [--repeats 3] [--heldout] [--out build/bench/revisions.json]

REV is checked out into a temporary git worktree and run from it, with PYTHONPATH pointing at
it; the working tree runs as it is. A relative --recipe (and the data paths in it) is read in
each revision's own tree. Each run is a fresh `python -m lora_cli train` process (tcmalloc as
`lora train` picks it). Reported per run: the final train loss (a pure refactor gives the same
loss to the last bit), training tokens/s (run.json), the process's wall and CPU time, and the
host's steal time during the run: on a shared machine a run whose CPU was taken by the host reads
slow, so the summary takes the medians of the runs with little steal. --heldout keeps the recipe's
validation data and reports the final held-out loss too (for a change that may alter the maths
only within noise, such as another way of drawing dropout masks); the evaluation's time then
counts in tokens/s, alike for both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEAL_LIMIT_S = 5.0  # runs with more host steal than this are reported but left out of the medians


def steal_seconds() -> float:
    """The host's steal time so far (/proc/stat, all CPUs), in seconds; 0 where not reported."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def train_once(code: Path, recipe: str, steps: int, out: Path, heldout: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-m", "lora_cli", "train", recipe, f"output_dir={out}", f"train.max_steps={steps}"]
    if not heldout:
        cmd.append("data.validation=null")
    before, stolen, started = resource.getrusage(resource.RUSAGE_CHILDREN), steal_seconds(), time.perf_counter()
    # Run in the revision's own tree: `python -m` puts the working directory first on sys.path,
    # before PYTHONPATH, so run from ROOT both revisions would import the working tree.
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    wall, stolen = time.perf_counter() - started, steal_seconds() - stolen
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads((out / "run.json").read_text())
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    result = {"final_train_loss": record["final"]["train_loss"],
              "tokens_per_s": record["timings"]["tokens_per_second"],
              "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "steal_s": round(stolen, 2)}
    if heldout:
        result["heldout_loss"] = record["final"]["eval_loss"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision to compare the working tree with")
    parser.add_argument("--recipe", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heldout", action="store_true", help="keep the recipe's validation data: final held-out loss")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "revisions.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lora-revisions-"))
    base_tree = work / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=ROOT, check=True,
                   capture_output=True)
    runs: dict[str, list[dict]] = {"base": [], "working tree": []}
    try:
        for i in range(args.repeats):
            for name, code in (("working tree", ROOT), ("base", base_tree)):  # interleaved
                result = train_once(code, args.recipe, args.steps, work / f"{name.replace(' ', '-')}-{i}", args.heldout)
                runs[name].append(result)
                print(f"{name:12} run {i + 1}: {result}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for name, results in runs.items():
        calm = [r for r in results if r["steal_s"] <= STEAL_LIMIT_S] or results
        summary[name] = {"runs_in_medians": len(calm),
                         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in calm),
                         "cpu_s": round(statistics.median(r["cpu_s"] for r in calm), 1),
                         "final_train_losses": sorted({r["final_train_loss"] for r in results})}
        if args.heldout:
            summary[name]["heldout_losses"] = sorted({r["heldout_loss"] for r in results})
    ratio = summary["working tree"]["tokens_per_s"] / summary["base"]["tokens_per_s"]
    same_loss = summary["working tree"]["final_train_losses"] == summary["base"]["final_train_losses"]
    print(f"\nworking tree vs {args.base}: tokens/s {ratio:.3f}x (medians of runs with <= {STEAL_LIMIT_S:g} s steal); "
          f"CPU s {summary['working tree']['cpu_s']} vs {summary['base']['cpu_s']}; "
          f"final train loss {'identical' if same_loss else 'DIFFERENT'}")
    if args.heldout:
        print(f"held-out loss: working tree {summary['working tree']['heldout_losses']}, "
              f"{args.base} {summary['base']['heldout_losses']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"base": args.base, "recipe": args.recipe, "steps": args.steps, "runs": runs,
                                    "summary": summary, "tokens_per_s_ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
