"""`lora export` on the embedded model: time and file size per quant type, what each costs in
fidelity (the export's own check), and llama.cpp's generation speed against transformers'.

    .venv/bin/python scripts/bench/export.py [--new-tokens 64] [--repeats 3] [--out build/bench/export.json]

A real 2-step `lora train` run of SmolLM2-135M-Instruct (LoRA r16, all linear layers), merged once
(`lora merge`, timed apart). Each export is a fresh `lora export --json` process: its wall time
includes loading the merged model, writing the file and the check (transformers reads the file
back and compares logits), which is most of it. With llama-cpp-python installed, each file then
generates --new-tokens greedy tokens in llama.cpp (2 threads, its own process, load excluded)
beside the merged model in transformers (`lora generate`'s path), medians of --repeats.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
from inference import THREADS, WORK, lora_command, make_run, run  # noqa: E402

QUANTS = ("f16", "bf16", "q8_0", "q5_1", "q4_1", "q4_0")
PROMPT = [{"role": "user", "content": "Define: Observatory"}]


def prompt_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)


def llama_cpp_worker(path: str, merged: str, new_tokens: int) -> None:
    from llama_cpp import Llama

    ids = prompt_ids(Path(merged))
    llm = Llama(model_path=path, n_ctx=512, n_threads=THREADS, verbose=False)
    times = []
    for _ in range(3):
        llm.reset()
        start = time.perf_counter()
        count = 0
        for _token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            count += 1
            if count == new_tokens:
                break
        times.append(time.perf_counter() - start)
    print(json.dumps({"tokens_per_s": new_tokens / statistics.median(times)}))


def transformers_worker(merged: str, new_tokens: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    net = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.tensor([prompt_ids(Path(merged))])
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.inference_mode():
        net.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            net.generate(ids, **kwargs)
            times.append(time.perf_counter() - start)
    print(json.dumps({"tokens_per_s": new_tokens / statistics.median(times)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=WORK / "export.json")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker[0] == "llama_cpp":
            llama_cpp_worker(args.worker[1], args.worker[2], args.new_tokens)
        else:
            transformers_worker(args.worker[1], args.new_tokens)
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    run_dir, _ = make_run(env, "auto", None, name="export-run")
    _, merge_seconds = run(lora_command("merge", str(run_dir), "--overwrite"), env)
    print(f"lora merge: {merge_seconds:.1f} s", flush=True)
    files = WORK / "export-files"
    files.mkdir(parents=True, exist_ok=True)
    exports = {}
    for quant in (*QUANTS, "adapter-f32"):
        target = files / f"model-{quant}.gguf"
        extra = ["--adapter-only"] if quant.startswith("adapter") else ["--quant", quant]
        argv = lora_command("export", str(run_dir), *extra, "-o", str(target), "--overwrite", "--json")
        out, seconds = run(argv, env)
        check = json.loads(out)["check"]
        exports[quant] = {"seconds": round(seconds, 1), "bytes": target.stat().st_size, "check": check}
        fidelity = (f"KL {check['kl']:.3g} nats (fine-tune moved the base {check['fine_tune_kl']:.3g}), "
                    f"top-1 {check['top1']:.1%}" if "kl" in check else f"{check['pairs']} pairs exact")
        print(f"{quant:12} {seconds:6.1f} s  {target.stat().st_size / 2**20:7.1f} MiB  {fidelity}", flush=True)

    speeds = {}
    if importlib.util.find_spec("llama_cpp") is not None:
        merged = str(run_dir / "merged")
        variants = {"transformers (merged)": ["transformers", merged]}
        variants.update({f"llama.cpp {q}": ["llama_cpp", str(files / f"model-{q}.gguf"), merged]
                         for q in ("f16", "q8_0", "q4_0")})
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, worker in variants.items():
                out, _ = run([sys.executable, __file__, "--new-tokens", str(args.new_tokens), "--worker", *worker], env)
                samples[name].append(json.loads(out.strip().splitlines()[-1])["tokens_per_s"])
        reference = statistics.median(samples["transformers (merged)"])
        print(f"\n{'generation':22} {'tokens/s':>9} {'x transformers':>15}   ({args.new_tokens} greedy tokens, "
              f"{THREADS} threads)")
        for name, values in samples.items():
            tps = statistics.median(values)
            speeds[name] = {"tokens_per_s": tps, "ratio": tps / reference, "all": [round(v, 1) for v in values]}
            print(f"{name:22} {tps:9.1f} {tps / reference:15.2f}")
    else:
        print("llama-cpp-python is not installed: generation speed skipped (make llama-cpp)")
    report = {"merge_seconds": merge_seconds, "exports": exports, "generation": speeds,
              "cores": os.cpu_count(), "threads": THREADS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
