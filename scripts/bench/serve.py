"""`lora serve` throughput and latency: 1, 4, 8 and 16 concurrent clients, every request to one
adapter vs spread over three adapters, against the same requests through `lora generate` one
after another.

    .venv/bin/python scripts/bench/serve.py [--model quickstart|tiny] [--new-tokens 64] [--rounds 4]
                                            [--no-prefix-cache] [--out build/bench/serve.json]

quickstart (what `make bench` runs): SmolLM2-135M-Instruct, the embedded model, with three adapters
from real 2-step `lora train` runs (LoRA r16, all linear layers, different seeds: an adapter's
speed does not depend on what it learned). tiny: the 2-layer test model, to check the script
itself in seconds. The server is the real CLI in its own process (2 threads); each client sends
--rounds chat requests one after another, greedy, at most --new-tokens tokens each. Tokens/s
counts the completion tokens the server reports over the wall time of the whole load; latency is
per request, from sending to the last byte. `lora generate` runs the same prompts from a file in
one process; its tokens/s excludes the model load, as the server's does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
from inference import THREADS, WORK, lora_command  # noqa: E402
from training import cpu_name  # noqa: E402

CONCURRENCY = (1, 4, 8, 16)
ADAPTERS = ("a", "b", "c")


def prompts(n: int) -> list[str]:
    rows = (ROOT / "data" / "devils-dictionary" / "test.jsonl").read_text().splitlines()
    return [json.loads(r)["messages"][0]["content"] for r in rows][:n]


def make_runs(kind: str, env: dict) -> list[Path]:
    import yaml

    if kind == "tiny":
        from tests.tiny import build_tiny_model

        model = WORK / "serve-tiny-model"
        if not (model / "config.json").is_file():
            build_tiny_model(model, "llama")
        name, dtype, extra = str(model), "float32", {}
    else:
        name, dtype, extra = "smollm2-135m-instruct", "auto", {"target_modules": "all-linear"}
    runs = []
    for i, adapter in enumerate(ADAPTERS):
        out = WORK / f"serve-{kind}-{adapter}"
        recipe = WORK / f"serve-{kind}-{adapter}.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(yaml.safe_dump({
            "model": {"name": name, "dtype": dtype},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, **extra},
            "data": {"train": str(ROOT / "data/devils-dictionary/train.jsonl"), "format": "chat", "max_length": 160},
            "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "log_every": 1, "seed": i},
            "output_dir": str(out),
        }, sort_keys=False))
        if not (out / "adapter" / "adapter_config.json").is_file():
            subprocess.run(lora_command("train", str(recipe), "--overwrite"), env=env, cwd=ROOT, check=True,
                           capture_output=True)
        runs.append(out)
    return runs


def start_server(runs: list[Path], env: dict, extra: list[str]):
    specs = [f"{name}={run}" for name, run in zip(ADAPTERS, runs)]
    process = subprocess.Popen(lora_command("serve", *specs, "--port", "0", *extra), env=env, cwd=ROOT,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            raise SystemExit("lora serve ended before serving")
        found = re.search(r"at (http://\S+)/v1", line)
        if found:
            return process, found.group(1)
    process.kill()
    raise SystemExit("lora serve did not start")


def load(url: str, clients: int, rounds: int, models: list[str], asks: list[str], new_tokens: int) -> dict:
    import httpx

    def client(index: int) -> list[tuple[float, int]]:
        done = []
        with httpx.Client(base_url=url, timeout=600) as http:
            for r in range(rounds):
                k = index * rounds + r
                body = {"model": models[k % len(models)], "max_tokens": new_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": asks[k % len(asks)]}]}
                start = time.perf_counter()
                reply = http.post("/v1/chat/completions", json=body)
                reply.raise_for_status()
                done.append((time.perf_counter() - start, reply.json()["usage"]["completion_tokens"]))
        return done

    before = httpx.get(url + "/health").json()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for per_client in pool.map(client, range(clients)) for x in per_client]
    wall = time.perf_counter() - start
    after = httpx.get(url + "/health").json()
    latencies = sorted(s for s, _ in results)
    tokens = sum(t for _, t in results)
    # Each request's first token comes from reading its prompt; the rest from decoding steps, whose
    # mean number of rows says how full the batch really was (answers of unequal length drain it).
    steps = after["steps"] - before["steps"]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
            "rows_per_step": round((tokens - len(results)) / steps, 2) if steps else None,
            "prefix_tokens_reused": after.get("prefix_tokens_reused", 0) - before.get("prefix_tokens_reused", 0)}


def sequential_generate(run: Path, asks: list[str], new_tokens: int, env: dict) -> dict:
    prompt_file = WORK / "serve-prompts.txt"
    prompt_file.write_text("\n".join(asks) + "\n")
    proc = subprocess.run(lora_command("generate", "--file", str(prompt_file), "--run", str(run), "--temperature",
                                       "0", "--max-new-tokens", str(new_tokens), "--json"),
                          env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    seconds, tokens = sum(r["seconds"] for r in rows), sum(r["tokens"] for r in rows)
    return {"requests": len(rows), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2),
            "p50_s": round(statistics.median(r["seconds"] for r in rows), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("quickstart", "tiny"), default="tiny")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="requests per client, one after another")
    parser.add_argument("--out", type=Path, default=WORK / "serve.json")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="serve with --no-prefix-cache (every prompt read whole), for an A/B of the cache")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
    runs = make_runs(args.model, env)
    asks = prompts(max(CONCURRENCY) * args.rounds)
    report = {"model": args.model, "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": THREADS,
              "prefix_cache": not args.no_prefix_cache,
              "machine": os.uname().machine, "cpus": os.cpu_count(), "cpu": cpu_name()}
    report["sequential_generate"] = sequential_generate(runs[0], asks, args.new_tokens, env)
    print(f"sequential lora generate: {report['sequential_generate']['tokens_per_s']} tok/s", file=sys.stderr)
    process, url = start_server(runs, env, ["--no-prefix-cache"] if args.no_prefix_cache else [])
    try:
        load(url, 2, 1, ["a"], asks, 8)  # warm-up: first-call costs are not the server's speed
        results = {}
        for mode, models in (("one_adapter", ["a"]), ("mixed_adapters", list(ADAPTERS) + [base_name(url)])):
            for clients in CONCURRENCY:
                result = load(url, clients, args.rounds, models, asks, args.new_tokens)
                results[f"{mode}/{clients}"] = result
                print(f"{mode:15} {clients:2} clients: {result['tokens_per_s']:8.1f} tok/s  "
                      f"p50 {result['p50_s']:.2f} s  p95 {result['p95_s']:.2f} s  "
                      f"{result['rows_per_step']} rows/step", file=sys.stderr)
        report["serve"] = results
    finally:
        process.terminate()
        process.wait(60)
    sequential = report["sequential_generate"]["tokens_per_s"]
    report["speedup_vs_sequential"] = {k: round(v["tokens_per_s"] / sequential, 2) for k, v in results.items()}
    report["mixed_vs_one_adapter"] = {
        c: round(results[f"mixed_adapters/{c}"]["tokens_per_s"] / results[f"one_adapter/{c}"]["tokens_per_s"], 2)
        for c in CONCURRENCY}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({"speedup_vs_sequential": report["speedup_vs_sequential"],
                      "mixed_vs_one_adapter": report["mixed_vs_one_adapter"]}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


def base_name(url: str) -> str:
    import httpx

    return httpx.get(url + "/v1/models").json()["data"][-1]["id"]  # the base is listed last


if __name__ == "__main__":
    main()
