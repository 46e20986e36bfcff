"""`lora export` on tiny real runs (Llama with GQA and ChatML; GPT-2 with Conv1D layers): GGUF files
read back by transformers' own GGUF loader compute what the merged model does, adapters hold every
LoRA pair in llama.cpp's layout, Modelfiles render conversations as the chat template does, and bad
input is refused before any work. With llama-cpp-python installed, llama.cpp itself runs the files."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_cli.commands.export import run as run_export
from lora_cli.errors import EXIT_RUNTIME, EXIT_USAGE
from lora_cli.export.verify import load_gguf_model
from tests.gotemplate import render_ollama
from tests.helpers import chat_rows, completion_rows, copy_run, lora_in_process, train_tiny_run

lora = lora_in_process
REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
# `make llama-cpp` builds it here; one on PATH serves as well
LLAMA_QUANTIZE = shutil.which("llama-quantize") or next(
    (str(p) for p in [REPO / "build" / "llama.cpp" / "bin" / "llama-quantize"] if p.is_file()), None)
needs_llama_cpp = pytest.mark.skipif(
    not LLAMA_CPP, reason="llama.cpp not installed (pip install llama-cpp-python; see docs/export.md)")

# The Llama 3 chat template (as Meta's tokenizer_config.json has it).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TWO_TURNS = [
    {"role": "user", "content": "Define: fox"},
    {"role": "assistant", "content": "A quick brown animal."},
    {"role": "user", "content": "Define: dog"},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_gpt2, tiny_llama):
    tmp = tmp_path_factory.mktemp("export-runs")
    short = {"max_steps": 20, "save_every": 1000}
    return {
        "llama": train_tiny_run(tmp, "llama-chat", tiny_llama, chat_rows(), train=short),
        "gpt2": train_tiny_run(tmp, "gpt2-text", tiny_gpt2, completion_rows(), train=short),
        "llama_base": tiny_llama,
        "gpt2_base": tiny_gpt2,
    }




def gguf_fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name.endswith(("tokens", "merges", "token_type")):
            out[name] = len(field.data)
            continue
        out[name] = field.contents()
    return out


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_reads_back_as_the_merged_model(runs, arch, quant, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = copy_run(runs[arch], tmp_path)
    result = run_export(run, quant=quant)
    path = Path(result.output)
    assert path == run / "export" / f"{run.name}-{quant}.gguf" and path.is_file()
    assert (run / "merged" / "lora_merge.json").is_file()  # merged first, as `lora merge` does
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    exported, read_tokenizer = load_gguf_model(path)  # transformers' GGUF loader, its gaps bridged

    sentence = "Define: fox\nA quick brown animal. Define: paris"
    ids = tokenizer(sentence)["input_ids"]
    assert read_tokenizer(sentence)["input_ids"] == ids
    ref, got = logits_of(merged, ids), logits_of(exported, ids)
    scale = float(ref.abs().max())
    if quant == "f16":
        assert float((ref - got).abs().max()) < 0.02 * scale
    else:  # 8 bits: the same next token wherever the merged model is decisive
        probs = ref.softmax(-1).topk(2).values
        decisive = probs[:, 0] - probs[:, 1] > 0.1
        assert decisive.any() and bool((ref.argmax(-1) == got.argmax(-1))[decisive].all())
    fields = gguf_fields(path)
    assert fields["general.architecture"] == arch and fields["general.type"] == "model"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == merged.config.vocab_size
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    if arch == "llama":
        assert fields["llama.attention.head_count_kv"] == merged.config.num_key_value_heads == 2
        assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(merged.config.rms_norm_eps)
        assert fields["tokenizer.chat_template"] == tokenizer.chat_template == read_tokenizer.chat_template
        assert result.check["fine_tune_kl"] is not None and result.check["fine_tune_kl"] > result.check["kl"]


def test_adapter_only_holds_every_lora_pair_in_gguf_layout(runs, tmp_path):
    import gguf
    from safetensors.numpy import load_file

    run = copy_run(runs["llama"], tmp_path)
    result = run_export(run, adapter_only=True)
    path = Path(result.output)
    assert path.name == f"{run.name}-adapter-f32.gguf" and not (run / "merged").exists()
    reader = gguf.GGUFReader(path)
    fields = gguf_fields(path)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(config["lora_alpha"])
    tensors = {t.name: t for t in reader.tensors}
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    pairs = {k.removesuffix(".lora_A.weight") for k in weights if k.endswith(".lora_A.weight")}
    assert len(tensors) == 2 * len(pairs) > 0
    for module in pairs:  # base_model.model.model.layers.0.self_attn.q_proj
        layer = int(module.split(".layers.")[1].split(".")[0])
        short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[module.rsplit(".", 1)[1]]
        a, b = weights[module + ".lora_A.weight"], weights[module + ".lora_B.weight"]
        la, lb = tensors[f"blk.{layer}.{short}.weight.lora_a"], tensors[f"blk.{layer}.{short}.weight.lora_b"]
        assert tuple(la.data.shape) == a.shape == (config["r"], a.shape[1])  # [r, in]
        assert tuple(lb.data.shape) == b.shape  # [out, r]
        if short in ("attn_q", "attn_k"):  # rows permuted into llama.cpp's RoPE order
            assert sorted(lb.data.ravel().tolist()) == sorted(b.ravel().tolist())
        else:
            assert (lb.data == b).all()
    assert result.check["pairs"] == len(pairs) and result.check["max_relative_diff"] < 1e-5


def test_modelfile_renders_the_chat_template(runs, tmp_path):
    from transformers import AutoTokenizer

    run = copy_run(runs["llama"], tmp_path)
    result = run_export(run, format="ollama", quant="f16")
    directory = run / "export" / "ollama"
    assert Path(result.output) == directory / "model.gguf" and directory.is_dir()
    assert sorted(p.name for p in directory.iterdir()) == ["Modelfile", "model.gguf"]
    text = (directory / "Modelfile").read_text()
    assert text == result.modelfile and "FROM ./model.gguf" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0.7" in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    expected = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    assert render_ollama(template, TWO_TURNS) == expected
    with_system = [{"role": "system", "content": "Be terse."}, *TWO_TURNS]
    assert render_ollama(template, with_system) == tokenizer.apply_chat_template(
        with_system, tokenize=False, add_generation_prompt=True)


def test_chat_formats_known_templates_and_default_system():
    """Llama 3's template and SmolLM2's (a default system prompt) translate to Ollama exactly."""
    from lora_cli.export.chat_formats import detect_chat_format
    from tests.tiny import train_tokenizer

    tokenizer = train_tokenizer(chat_template=LLAMA3_TEMPLATE)
    tokenizer.bos_token = "<|begin_of_text|>"
    detected = detect_chat_format(tokenizer)
    assert detected.format.name == "llama3" and detected.default_system is None
    expected = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    assert tokenizer.bos_token + render_ollama(detected.format.ollama_template(), TWO_TURNS) == expected

    smollm = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tokenizer = train_tokenizer(chat_template=smollm)
    detected = detect_chat_format(tokenizer)
    assert detected.format.name == "chatml"
    assert detected.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    expected = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    assert render_ollama(detected.format.ollama_template(), TWO_TURNS, system=detected.default_system) == expected
    # A template no known format reproduces is not guessed at.
    other = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tokenizer = train_tokenizer(chat_template=other)
    assert detect_chat_format(tokenizer) is None


def test_current_merge_is_reused_and_a_stale_one_left_alone(runs, tmp_path, capsys):
    run = copy_run(runs["gpt2"], tmp_path)
    run_export(run, quant="f16")
    assert "merging first" in capsys.readouterr().err
    run_export(run, quant="bf16")
    assert "using the merged model" in capsys.readouterr().err
    # The adapter changes (retrained): the old merge is not used, nor replaced.
    weights = run / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    changed = {k: v * 1.5 if ".lora_B." in k else v for k, v in load_file(weights).items()}
    save_file(changed, weights)
    before = (run / "merged" / "model.safetensors").read_bytes()
    run_export(run, quant="f16", overwrite=True)
    assert "cannot be used (the adapter changed since it was merged)" in capsys.readouterr().err
    assert (run / "merged" / "model.safetensors").read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.startswith(".export-merge-")]


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_llama_cpp_generates_what_lora_generate_does(runs, arch, tmp_path):
    """llama.cpp itself: the f16 file's greedy tokens are `lora generate --temperature 0`'s on the
    merged model; the base file + the adapter file computes the merged model's logits."""
    import numpy as np
    from llama_cpp import Llama

    from lora_cli.commands.generate import run as run_generate

    run = copy_run(runs[arch], tmp_path)
    model_file = Path(run_export(run, quant="f16").output)
    adapter_file = Path(run_export(run, adapter_only=True).output)
    prompt = "Define: paris" if arch == "llama" else "Define: fox\n"
    out = run_generate(prompt, model=str(run / "merged"), temperature=0, max_new_tokens=12, stream=False,
                       chat=arch == "llama", stdout=io.StringIO())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    if arch == "llama":
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    else:
        ids = tokenizer(prompt)["input_ids"]
    llm = Llama(model_path=str(model_file), verbose=False, n_ctx=128, logits_all=True)
    generated = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        if token == tokenizer.eos_token_id or len(generated) == out[0]["tokens"]:
            break
        generated.append(token)
    assert tokenizer.decode(generated, skip_special_tokens=True) == out[0]["output"]
    llm.close()

    # one base, many adapters: the base's own GGUF + the adapter file = the merged model
    base_file = tmp_path / "base-f32.gguf"
    from lora_cli.export.gguf_files import write_model_gguf

    base_dir = runs[f"{arch}_base"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    write_model_gguf(base_file, base, AutoTokenizer.from_pretrained(base_dir), base_dir, "f32", name="base",
                     chat=None, description="base")
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    llm = Llama(model_path=str(base_file), lora_path=str(adapter_file), verbose=False, n_ctx=128, logits_all=True)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    llm.close()
    ref = logits_of(merged, ids).numpy()
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    assert np.abs(logits_of(base.eval(), ids).numpy() - ref).max() > 0.5  # the adapter matters


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "llama3-rope"])
def test_other_llama_family_models(arch, tmp_path):
    """Qwen2 (q/k/v biases, half-split RoPE kept as it is, tied embeddings), Mistral (GGUF llama) and a
    Llama with Llama 3.1's RoPE scaling (the rope_freqs tensor): written, read back by transformers
    (and run by llama.cpp where installed) with the logits of the model itself."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from lora_cli.export.chat_formats import detect_chat_format
    from lora_cli.export.gguf_files import write_model_gguf
    from lora_cli.export.verify import check_model_gguf
    from tests.tiny import CHATML_TEMPLATE, INIT_RANGE, train_tokenizer

    tokenizer = train_tokenizer(chat_template=CHATML_TEMPLATE)
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 initializer_range=INIT_RANGE, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
        with torch.no_grad():  # random biases, so a dropped or misplaced one shows
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**shape, tie_word_embeddings=False))
    else:
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        model = LlamaForCausalLM(LlamaConfig(**shape, rope_parameters=rope))
    directory = tmp_path / arch
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    path = tmp_path / f"{arch}.gguf"
    write_model_gguf(path, model, tokenizer, directory, "f16", name=arch, chat=detect_chat_format(tokenizer),
                     description="test")
    check = check_model_gguf(path, model.eval(), tokenizer, "f16")
    assert check.max_diff < 0.02 * check.scale
    fields = gguf_fields(path)
    assert fields["general.architecture"] == ("qwen2" if arch == "qwen2" else "llama")
    if arch == "llama3-rope":
        import gguf

        assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    if LLAMA_CPP:
        import numpy as np
        from llama_cpp import Llama

        ids = tokenizer("once upon a time there was a tiny model that learned to count")["input_ids"]
        llm = Llama(model_path=str(path), verbose=False, n_ctx=128, logits_all=True)
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
        llm.close()
        ref = logits_of(model, ids).numpy()
        assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()


@pytest.mark.skipif(LLAMA_QUANTIZE is None, reason="llama-quantize not built (make llama-cpp)")
def test_k_quants_go_through_llama_quantize(runs, tmp_path, monkeypatch):
    """q4_k_m: our f16 file quantized by llama.cpp's own tool, then checked like every export (the
    tiny model's 64-wide rows are below k-quants' 256: llama-quantize picks its fallback types)."""
    import gguf

    monkeypatch.setenv("PATH", f"{Path(LLAMA_QUANTIZE).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    run = copy_run(runs["llama"], tmp_path)
    result = run_export(run, quant="q4_k_m")
    path = Path(result.output)
    assert path.name.endswith("-q4_k_m.gguf") and result.check["kl"] <= 1.0
    assert gguf_fields(path)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert not list(path.parent.glob("*.f16.gguf"))  # the intermediate file is gone


# --------------------------------------------------------------------------- bad input


def test_bad_options_exit_2_before_any_work(runs, tmp_path, monkeypatch, capsys):
    run = copy_run(runs["llama"], tmp_path)
    cases = [
        (["--format", "onnx"], "--format onnx is not one of gguf, ollama"),
        (["--quant", "q3_0"], "--quant q3_0 is not one of"),
        (["--adapter-only", "--quant", "q4_0"], "llama.cpp applies LoRA files in f32, f16, bf16, q8_0 only"),
        (["--adapter-only", "--format", "ollama"], "--adapter-only writes a GGUF LoRA file"),
        (["-o", str(tmp_path / "model.bin")], "a GGUF file's name ends in .gguf"),
        (["-o", str(run / "adapter" / "x.gguf")], "would replace the run (or its adapter"),
    ]
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    cases.append((["--quant", "q4_k_m"], "`llama-quantize`, which is not on PATH"))
    for args, message in cases:
        code, out, err = lora(monkeypatch, capsys, "export", run, *args)
        assert code == EXIT_USAGE, (args, err)
        assert message in err and "Traceback" not in err, (args, err)
    assert not (run / "merged").exists() and not (run / "export").exists()


def test_existing_outputs_are_kept_unless_overwrite_and_ours(runs, tmp_path, monkeypatch, capsys):
    run = copy_run(runs["gpt2"], tmp_path)
    target = tmp_path / "out.gguf"
    target.write_text("my notes")
    code, _, err = lora(monkeypatch, capsys, "export", run, "-o", target)
    assert code == EXIT_USAGE and "already exists" in err and "--overwrite" in err
    code, _, err = lora(monkeypatch, capsys, "export", run, "-o", target, "--overwrite")
    assert code == EXIT_USAGE and "is not an earlier `lora export` output" in err
    assert target.read_text() == "my notes"
    code, out, err = lora(monkeypatch, capsys, "export", run, "--quant", "f16", "--json")
    assert code == 0, err
    written = Path(json.loads(out)["output"])
    assert written.read_bytes()[:4] == b"GGUF" and oct(written.stat().st_mode & 0o777) != "0o600"
    code, _, err = lora(monkeypatch, capsys, "export", run, "--quant", "f16")
    assert code == EXIT_USAGE and "already exists" in err
    code, _, err = lora(monkeypatch, capsys, "export", run, "--quant", "f16", "--overwrite")
    assert code == 0, err


def test_unsupported_architecture_and_dora_are_refused(runs, tmp_path, monkeypatch, capsys):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    run = copy_run(runs["gpt2"], tmp_path)
    neox = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)).save_pretrained(neox)
    recipe = (run / "recipe.yaml").read_text()
    (run / "recipe.yaml").write_text(recipe.replace(str(runs["gpt2_base"]), str(neox)))
    code, _, err = lora(monkeypatch, capsys, "export", run)
    assert code == EXIT_USAGE and "does not support the architecture 'gpt_neox'" in err and "GPT-2" in err

    run = copy_run(runs["llama"], tmp_path / "dora")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    code, _, err = lora(monkeypatch, capsys, "export", run, "--adapter-only")
    assert code == EXIT_USAGE and "DoRA" in err and "drop --adapter-only" in err
    assert not (run / "export").exists()

    # a pre-tokenizer llama.cpp does not implement: said before the merge, not guessed
    run = copy_run(runs["llama"], tmp_path / "pre")
    spec = json.loads((run / "adapter" / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (run / "adapter" / "tokenizer.json").write_text(json.dumps(spec))
    code, _, err = lora(monkeypatch, capsys, "export", run)
    assert code == EXIT_USAGE and "llama.cpp has no pre-tokenizer matching" in err
    assert not (run / "merged").exists() and not (run / "export").exists()


def test_a_failed_check_or_a_nan_adapter_leaves_nothing(runs, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    from lora_cli.export import verify

    run = copy_run(runs["llama"], tmp_path)
    monkeypatch.setitem(verify.QUANTIZED, "q8_0", verify.Tolerance(min_top1=1.01, max_kl=0.0))
    code, _, err = lora(monkeypatch, capsys, "export", run, "--quant", "q8_0")
    assert code == EXIT_RUNTIME and "does not compute what the merged model does" in err and "nothing was saved" in err
    assert list((run / "export").iterdir()) == []

    run = copy_run(runs["gpt2"], tmp_path / "nan")
    weights = run / "adapter" / "adapter_model.safetensors"
    save_file({k: v * float("nan") for k, v in load_file(weights).items()}, weights)
    code, _, err = lora(monkeypatch, capsys, "export", run)
    assert code == EXIT_RUNTIME and "non-finite" in err and "Traceback" not in err
    assert not (run / "export").exists() or list((run / "export").iterdir()) == []


def test_export_help_is_fast():
    """`lora export --help` loads no model library (the command imports them when it runs)."""
    done = subprocess.run([sys.executable, "-m", "lora_cli", "export", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "--adapter-only" in done.stdout and "q4_k_m" in done.stdout
