"""`lora merge`: fold a run's adapter into its base and save a plain transformers model.

    recipe.yaml ─► base (float32) ─┐
    adapter/    ───────────────────┼─► merge_and_unload ─► verify ─► cast to --dtype ─► merged/
    (QLoRA) 4-bit base ─► dequantize ┘        (probe logits = base + adapter, as trained)

The fold always happens in float32, whatever --dtype says: W + (alpha/r)·B·A is exact there,
and the cast to bfloat16/float16 comes last, once.

QLoRA runs trained the adapter against the 4-bit weights *as they dequantize*, which differ from
the original full-precision weights by the quantization error. `--onto quantized` (the default)
folds into exactly those dequantized weights, so the merged model reproduces what was trained
and evaluated; `--onto original` folds into the original weights (closer to the unquantized
base, but the adapter never saw them).

Why not `model.dequantize()` from transformers: for GPT-2-style models (Conv1D layers stored as
[in, out]) it swaps in nn.Linear modules holding [out, in] weights, and the saved checkpoint then
either fails to load or, for square layers, loads silently transposed. We instead dequantize each
4/8-bit layer (peft's `dequantize_module_weight`) into a freshly loaded full-precision copy of the
same architecture, transposing where that copy uses Conv1D. The saved model is then verified as
plain transformers loads it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora_cli.errors import EXIT_RUNTIME, LoraError, RunDirError

DTYPES = ("float32", "bfloat16", "float16")
ONTO = ("quantized", "original")

# Largest allowed max |logit difference|, relative to max(1, max |reference logit|). float32 is
# summation-order noise; half precisions are the rounding of every weight and activation
# (measured on SmolLM2-135M: 4% of the logit scale in bfloat16, 0.4% in float16).
TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 0.15, "int8": 0.15}

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far away, there lived a",
)


class MergeError(LoraError):
    """The merge produced a model that does not do what the adapter did (or is not finite)."""

    exit_code = EXIT_RUNTIME


@dataclass
class MergeResult:
    output: Path
    dtype: str
    onto: str | None  # None for a run that was not quantized
    max_diff: float  # the merged model in float32 (in memory) vs the reference (base + adapter)
    saved_max_diff: float  # the saved model in --dtype, as transformers loads it, vs the reference
    tolerance: float  # for saved_max_diff


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- checks before any work


# Written into every merged model: what `lora merge` wrote there, so that --overwrite replaces
# only its own output (never a base model, a hub snapshot or a directory a user filled).
MARKER = "lora_merge.json"
# Merged models written before the marker existed carry this line of model_card().
CARD_MARK = "The LoRA adapter of the run `"


def check_output(output: Path, paths, *, overwrite: bool, base_dir: Path | None = None) -> None:
    """Refuse to clobber anything but an earlier merged model, and that only with --overwrite.

    `base_dir` is the run's base model directory (a local source): never written over, nor
    a directory holding it, even with --overwrite (the run would silently load the merged model as its base).
    """
    out = output.resolve()
    root = paths.root.resolve()
    inside = [root / "adapter", root / "checkpoints"]
    if out == root or root.is_relative_to(out) or any(out.is_relative_to(d) for d in inside):
        raise RunDirError(
            f"--output {output} would replace the run (or its adapter or checkpoints)",
            f"Write the merged model to its own directory, e.g. {paths.merged} (the default).",
        )
    if base_dir is not None and base_dir.resolve().is_relative_to(out):
        raise RunDirError(
            f"--output {output} would replace the run's base model ({base_dir})",
            f"Write the merged model to its own directory, e.g. {paths.merged} (the default).",
        )
    if base_dir is not None and out.is_relative_to(base_dir.resolve()):
        raise RunDirError(
            f"--output {output} is inside the run's base model directory ({base_dir}); refusing to write there",
            f"Write the merged model to its own directory, e.g. {paths.merged} (the default).",
        )
    check_can_create(output)
    if not output.exists():
        return
    if not output.is_dir():
        raise RunDirError(f"--output {output} is a file", "Name a directory for the merged model.")
    if not any(output.iterdir()):
        return
    if not overwrite:
        raise RunDirError(
            f"{output} already exists",
            "Pass --overwrite to replace it, or --output DIR to write the merged model elsewhere.",
        )
    foreign = files_merge_did_not_write(output)
    if foreign is None:
        raise RunDirError(
            f"{output} is not a model written by `lora merge`; refusing to replace it",
            "--overwrite replaces only an earlier merged model: choose another --output.",
        )
    if foreign:
        raise RunDirError(
            f"{output} holds files `lora merge` did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); refusing to replace it",
            "Move them out of the directory first, or choose another --output.",
        )
    users = runs_based_on(output, paths)
    if users:
        names = ", ".join(str(r) for r in users[:3]) + (", ..." if len(users) > 3 else "")
        raise RunDirError(
            f"{output} is the base model of run {names}; replacing it would silently change "
            + ("that run (its adapter was trained on this merge)" if len(users) == 1
               else "those runs (their adapters were trained on this merge)"),
            f"Write the new merge elsewhere with --output DIR. To replace it anyway, delete {output} first.",
        )


def check_can_create(output: Path) -> None:
    """Refuse, before any work, an --output that could not be written: a file on its path, a
    directory without write permission, a read-only or special file system. The merged model is
    written beside the target first (runs.atomic_directory), so that is where we try."""
    parent = Path(os.path.abspath(output)).parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(
            f"cannot write --output {output}: {parent} is a file, not a directory",
            "Name a directory for the merged model whose parents are directories (or do not exist yet).",
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{output.name or 'merged'}.probe-", dir=parent))
    except OSError as e:
        raise RunDirError(
            f"cannot write --output {output}: cannot create anything in {parent} ({e.strerror or e})",
            "Choose a directory you can write to with --output DIR.",
        ) from None


# What `save_pretrained` of a merged model and its tokenizer, plus this module, write: in a merge
# made before the marker existed, anything else is a user's and must not be deleted.
MERGE_FILES = frozenset({
    "README.md", MARKER, "config.json", "generation_config.json", "model.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
    "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
})
SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")


def files_merge_did_not_write(directory: Path) -> list[str] | None:
    """Names in `directory` that an earlier merge did not write; None if no merge wrote it."""
    try:
        files = json.loads((directory / MARKER).read_text(encoding="utf-8"))["files"]
        if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
            raise TypeError
        written = set(files)
    except (OSError, ValueError, KeyError, TypeError):
        written = None
    entries = list(directory.iterdir())
    if written is None:  # an older merge (no marker, or a damaged one): recognised by its model card
        try:
            card = (directory / "README.md").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        if CARD_MARK not in card or not (directory / "config.json").is_file():
            return None
        # Which files it wrote is not known: only what a merge writes may go, never a subdirectory.
        return sorted(p.name + ("/" if p.is_dir() else "") for p in entries
                      if p.is_dir() or not (p.name in MERGE_FILES or SHARD.fullmatch(p.name)))
    return sorted(p.name + ("/" if p.is_dir() else "") for p in entries
                  if p.is_dir() or (p.name not in written and p.name != MARKER))


def runs_based_on(output: Path, paths) -> list[Path]:
    """Runs (under ./runs and beside this run) whose base model is `output` or inside it: their
    adapters were trained on that model, so replacing it would change them without a word."""
    from lora_cli.runs import RUNS_ROOT, run_dirs

    out = output.resolve()
    seen, found = set(), []
    for root in (paths.root.parent, output.parent.parent, RUNS_ROOT):
        for run in sorted(run_dirs(root)):
            if run.resolve() in seen:
                continue
            seen.add(run.resolve())
            base = _run_base_path(run)
            if base is not None and base.resolve().is_relative_to(out):
                found.append(run)
    return found


def _run_base_path(run: Path) -> Path | None:
    """The local base model directory a run trained on, as recorded (None if none or unreadable)."""
    from lora_cli.config import load_recipe
    from lora_cli.runs import RunPaths, with_run_paths

    try:
        path = Path(with_run_paths(load_recipe(run / "recipe.yaml"), RunPaths(run)).model.name).expanduser()
    except Exception:  # another run's broken files (or its deleted base) are not this merge's business
        return None
    return path if path.exists() else None


def resolve_merge_dtype(dtype: str | None, trained_dtype: str) -> str:
    """--dtype, else the dtype the run trained its base in (pinned by load_run_recipe)."""
    if dtype is not None and dtype not in DTYPES:
        raise LoraError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}", "Use --dtype float32, bfloat16 or float16.")
    return dtype or trained_dtype


# --------------------------------------------------------------------------- probes and comparisons


def probe_inputs(tokenizer, vocab_size: int) -> list:
    """A few token sequences: plain text, a chat turn (if there is a template), random ids."""
    import torch

    texts = list(PROBE_TEXTS)
    if getattr(tokenizer, "chat_template", None):
        try:
            texts.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hello! Who are you?"}], tokenize=False, add_generation_prompt=True
            ))
        except Exception:  # a template that wants other roles or arguments: plain text is enough
            pass
    probes = [torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]]) for t in texts]
    generator = torch.Generator().manual_seed(0)
    probes.append(torch.randint(0, vocab_size, (1, 24), generator=generator))
    return [p for p in probes if p.shape[1] > 0]


def probe_logits(model, probes: list) -> list:
    import torch

    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=p.to(device), use_cache=False).logits.float().cpu() for p in probes]


def max_abs_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def logit_scale(logits: list) -> float:
    return max(1.0, max(float(x.abs().max()) for x in logits))


def check_finite_logits(logits: list, what: str) -> None:
    """A diverged adapter can have finite weights and still give NaN/inf outputs: say so, rather
    than let a NaN difference read as a mismatch between adapter and base."""
    import torch

    if not all(bool(torch.isfinite(x).all()) for x in logits):
        raise MergeError(
            f"the outputs of {what} are non-finite (NaN or inf) on the probe inputs: the adapter is "
            "broken (its training diverged); nothing was saved",
            "Retrain with a lower train.lr (`lora runs` and the run's metrics.jsonl show where the loss went bad).",
        )


def check_finite(model, what: str) -> None:
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise MergeError(
                f"{what}: {name} has {bad} non-finite values (NaN or inf); nothing was saved",
                "If the adapter itself is broken (training diverged), retrain with a lower train.lr. "
                "If only --dtype float16 overflows, use --dtype bfloat16 or float32.",
            )


# --------------------------------------------------------------------------- dequantizing QLoRA bases


def dequantized_weights(quantized_model) -> dict:
    """{module name: float32 weight [out, in]} for every bitsandbytes 4-bit / 8-bit layer."""
    import torch
    from peft.utils.integrations import dequantize_module_weight

    out = {}
    for name, module in quantized_model.named_modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            out[name] = dequantize_module_weight(module).detach().to("cpu", torch.float32).clone()
    return out


def load_dequantized(model, weights: dict) -> None:
    """Copy dequantized weights into a full-precision model of the same architecture, in place."""
    import torch

    with torch.no_grad():
        for name, weight in weights.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise MergeError(f"the full-precision base has no layer {name} (the 4-bit base has)",
                                 "Merge with --onto original.") from None
            if type(module).__name__ == "Conv1D":  # GPT-2 style: weight stored as [in, out]
                weight = weight.T
            if tuple(module.weight.shape) != tuple(weight.shape):
                raise MergeError(
                    f"{name}: the dequantized weight has shape {tuple(weight.shape)}, the full-precision "
                    f"layer {tuple(module.weight.shape)}",
                    "Merge with --onto original.",
                )
            module.weight.copy_(weight.to(module.weight.dtype))


# --------------------------------------------------------------------------- the merge


def adapter_tokenizer(paths, recipe, source):
    """The tokenizer saved with the adapter (what training used), else the base model's."""
    from lora_cli.model import load_tokenizer

    if (paths.adapter / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(paths.adapter), trust_remote_code=recipe.model.trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return load_tokenizer(recipe.model, source)


def run_merge(
    run: str | Path | None,
    *,
    dtype: str | None = None,
    output: str | Path | None = None,
    onto: str | None = None,
    overwrite: bool = False,
) -> MergeResult:
    """Merge the run's adapter into its base, verify, and save under `output` (default RUN/merged)."""
    from lora_cli.runs import load_run_recipe, resolve_run

    paths = resolve_run(run)
    recipe = load_run_recipe(paths)
    quantization = recipe.model.quantization
    if onto is not None and onto not in ONTO:
        raise LoraError(f"--onto {onto} is not one of {', '.join(ONTO)}", "Use --onto quantized or --onto original.")
    if quantization == "none":
        if onto is not None:
            info(f"note: {paths.root} trained on a full-precision base; --onto has no effect")
        onto = None
    else:
        onto = onto or "quantized"
    out_dtype = resolve_merge_dtype(dtype, recipe.model.dtype)
    output = Path(output) if output is not None else paths.merged
    # A local base directory is model.name itself (resolve_model_source); found here without
    # converting a GGUF first, so the checks stay instant (a GGUF cache has no merge marker).
    base_dir = Path(recipe.model.name).expanduser()
    check_output(output, paths, overwrite=overwrite, base_dir=base_dir if base_dir.is_dir() else None)

    from lora_cli.train import quiet_libraries

    quiet_libraries()
    import torch

    from lora_cli.model import load_adapter, load_base_model, resolve_model_source

    source = resolve_model_source(recipe.model)
    info(f"run: {paths.root}  base: {source.description}" + (f" ({quantization})" if onto else ""))
    tokenizer = adapter_tokenizer(paths, recipe, source)

    # Precision of the forward the adapter was trained with: the 4-bit layers compute in
    # compute_dtype; LLM.int8 layers also quantize their inputs, so that forward is approximate.
    trained_dtypes = {recipe.model.dtype}  # pinned: the dtypes the run recorded (load_run_recipe)
    if quantization == "4bit":
        trained_dtypes.add(recipe.model.compute_dtype)
    elif quantization == "8bit":
        trained_dtypes.add("int8")

    trained_logits = dequantized = None
    if onto:
        qbase = load_base_model(recipe.model, source)
        if onto == "quantized":
            dequantized = dequantized_weights(qbase)
            if not dequantized:
                raise MergeError(f"found no {quantization} layers in the quantized base", "Merge with --onto original.")
        qmodel = load_adapter(qbase, paths.adapter)
        probes = probe_inputs(tokenizer, qmodel.config.vocab_size)
        trained_logits = probe_logits(qmodel, probes)
        check_finite_logits(trained_logits, f"the {quantization} base + adapter")
        del qmodel, qbase

    full = dataclasses.replace(recipe.model, quantization="none", dtype="float32")
    base = load_base_model(full, source)
    if dequantized is not None:
        load_dequantized(base, dequantized)
        info(f"dequantized {len(dequantized)} {quantization} layers to float32: the weights the adapter was trained on")
        del dequantized
    model = load_adapter(base, paths.adapter)
    if trained_logits is None:
        probes = probe_inputs(tokenizer, model.config.vocab_size)
    reference = probe_logits(model, probes)  # float32 base (dequantized or not) + adapter, unmerged
    ref_name = {None: "base + adapter", "quantized": f"dequantized {quantization} base + adapter",
                "original": "original float32 base + adapter"}[onto]
    check_finite_logits(reference, ref_name)
    scale = logit_scale(reference)
    if onto == "original":
        changed = max_abs_diff(reference, trained_logits)
        info(
            f"--onto original: folding into the original full-precision weights, not the {quantization} "
            f"weights the adapter was trained on. The merged model is closer to the unquantized base but "
            f"differs from what was trained and evaluated: max |logit difference| {changed:.3g} on the probes "
            f"(use the default --onto quantized to reproduce the trained model exactly)"
        )

    merged = model.merge_and_unload()
    del model
    check_finite(merged, "the merged model")
    merged_logits = probe_logits(merged, probes)

    # 1. The fold itself, in float32: only summation-order noise allowed.
    tolerance = TOLERANCE["float32"] * scale
    diff = max_abs_diff(merged_logits, reference)
    print(f"verify: max |logits(merged) - logits({ref_name})| = {diff:.3g} "
          f"on {len(probes)} probes (tolerance {tolerance:.3g})")
    if not diff <= tolerance:
        raise MergeError(
            f"the merged model does not reproduce the adapter: max logit difference {diff:.3g} > {tolerance:.3g}; nothing was saved",
            "Check that the adapter matches the run's base model.",
        )
    # QLoRA: and it is the model that was trained (the quantized forward, within its precision).
    if onto == "quantized":
        as_trained = max_abs_diff(merged_logits, trained_logits)
        trained_tolerance = max(TOLERANCE[d] for d in trained_dtypes) * scale
        print(f"verify: max |logits(merged) - logits({quantization} base + adapter, as trained)| = {as_trained:.3g} "
              f"(tolerance {trained_tolerance:.3g})")
        if not as_trained <= trained_tolerance:
            raise MergeError(
                f"the merged model does not reproduce the {quantization} model that was trained: max logit "
                f"difference {as_trained:.3g} > {trained_tolerance:.3g}; nothing was saved",
                "Merge with --onto original, and please report this model.",
            )

    # 2. Cast to --dtype and save; what is checked from here on is the saved model as plain
    # transformers loads it (it keeps e.g. rotary buffers in float32, which an in-memory cast
    # does not, so the in-memory cast model is not what users get).
    if out_dtype != "float32":
        merged = merged.to(getattr(torch, out_dtype))
        check_finite(merged, f"the merged model cast to {out_dtype}")
    merged.config.use_cache = True  # training turns the KV cache off; inference wants it
    digests = tensor_digests(merged)

    from transformers import AutoModelForCausalLM

    from lora_cli.runs import atomic_directory

    try:
        with atomic_directory(output) as tmp:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del merged
            reloaded = AutoModelForCausalLM.from_pretrained(
                tmp, dtype=getattr(torch, out_dtype), trust_remote_code=recipe.model.trust_remote_code
            )
            check_finite(reloaded, "the saved model")
            changed = sorted(k for k, v in tensor_digests(reloaded).items() if digests.get(k) != v)
            missing = sorted(set(digests) - set(tensor_digests(reloaded)))
            if changed or missing:
                raise MergeError(
                    f"the saved model does not load back with the merged weights ({', '.join((changed + missing)[:3])}"
                    f"{', ...' if len(changed + missing) > 3 else ''}); nothing was saved",
                    "This architecture may not survive save_pretrained after merging; please report it.",
                )
            # 3. The saved model against base + adapter: rounding within what --dtype allows.
            saved_tolerance = TOLERANCE[out_dtype] * scale
            saved_diff = max_abs_diff(probe_logits(reloaded, probes), reference)
            del reloaded
            print(f"verify: the saved model ({out_dtype}, loaded with plain transformers): "
                  f"max |logit difference| = {saved_diff:.3g} (tolerance {saved_tolerance:.3g})")
            if not saved_diff <= saved_tolerance:
                raise MergeError(
                    f"the saved {out_dtype} model differs from base + adapter by {saved_diff:.3g} > "
                    f"{saved_tolerance:.3g}; nothing was saved",
                    "Use --dtype float32 (or bfloat16 if float16 overflows).",
                )
            (tmp / "README.md").write_text(model_card(paths, recipe, source.description, onto, out_dtype, saved_diff), encoding="utf-8")
            marker = {"run": str(paths.root), "base": source.description, "dtype": out_dtype, "onto": onto,
                      "files": sorted(p.name for p in tmp.iterdir())}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    except OSError as e:  # disk full, permissions changed meanwhile, ...: the old output is left as it was
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise MergeError(
            f"saving the merged model to {output} failed: {e.strerror or e}{where}; nothing was saved",
            "Free some disk space, or choose another --output DIR you can write to.",
        ) from None
    print(f"merged model saved to {output} ({out_dtype})")
    return MergeResult(output, out_dtype, onto, diff, saved_diff, saved_tolerance)


def tensor_digests(model) -> dict[str, str]:
    """name -> sha1 of the tensor's bytes (dtype and shape included): equal means identical."""
    import hashlib

    import torch

    out = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest = hashlib.sha1(f"{t.dtype}{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
        out[name] = digest.hexdigest()
    return out


def model_card(paths, recipe, base: str, onto: str | None, dtype: str, diff: float) -> str:
    from lora_cli.generate import trained_on_chat

    prompt_format = (
        "chat template (trained on chat data: `lora generate --chat --model DIR PROMPT`)"
        if trained_on_chat(paths, recipe) else "plain text"
    )
    how = {None: "into the full-precision base",
           "quantized": f"into the {recipe.model.quantization} base weights as they dequantize (what the adapter was trained on)",
           "original": "into the original full-precision base weights (not the quantized weights it was trained on)"}[onto]
    return (
        "---\nlibrary_name: transformers\n---\n\n"
        f"# {paths.root.name} (merged)\n\n"
        f"{CARD_MARK}{paths.root}` folded {how}, saved as a plain transformers "
        f"model ({dtype}); it needs no peft.\n\n"
        f"- base model: {base}\n- LoRA: r={recipe.lora.r}, alpha={recipe.lora.alpha:g}, "
        f"target_modules={recipe.lora.target_modules}\n"
        f"- verified: max |logit difference| to base + adapter on the probe inputs: {diff:.3g}\n"
        f"- prompt format: {prompt_format}\n"
    )
