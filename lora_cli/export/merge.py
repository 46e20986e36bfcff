"""Merging a run: fold its adapter into its base and save a plain transformers model (`lora merge`,
and `lora export` when the run has no current merged model).

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

model/merging.py dequantizes QLoRA bases and holds the probe checks; the saved model is verified
as plain transformers loads it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from lora_cli.artifacts.model_card import merged_model_card
from lora_cli.console import info, quiet_libraries
from lora_cli.errors import LoraError, MergeError, RunDirError
from lora_cli.fsutil import atomic_directory, cannot_write_in
from lora_cli.model.adapters import load_adapter
from lora_cli.model.loading import adapter_tokenizer, load_base_model
from lora_cli.model.merging import (
    TOLERANCE,
    check_finite,
    check_finite_logits,
    dequantized_weights,
    load_dequantized,
    logit_scale,
    max_abs_diff,
    probe_inputs,
    probe_logits,
    tensor_digests,
)
from lora_cli.model.sources import resolve_model_source
from lora_cli.run.lookup import resolve_run, run_dirs
from lora_cli.run.merged import MARKER, adapter_digest, files_merge_did_not_write
from lora_cli.run.paths import RUNS_ROOT, RunPaths
from lora_cli.run.recipes import load_run_recipe, run_base_path, trained_on_chat

DTYPES = ("float32", "bfloat16", "float16")

ONTO = ("quantized", "original")


@dataclass
class MergeResult:
    output: Path
    dtype: str
    onto: str | None  # None for a run that was not quantized
    max_diff: float  # the merged model in float32 (in memory) vs the reference (base + adapter)
    saved_max_diff: float  # the saved model in --dtype, as transformers loads it, vs the reference
    tolerance: float  # for saved_max_diff


def merge_run(
    run: str | Path | None,
    *,
    dtype: str | None = None,
    output: str | Path | None = None,
    onto: str | None = None,
    overwrite: bool = False,
) -> MergeResult:
    """Merge the run's adapter into its base, verify, and save under `output` (default RUN/merged)."""
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

    quiet_libraries()
    source = resolve_model_source(recipe.model)
    info(f"run: {paths.root}  base: {source.description}" + (f" ({quantization})" if onto else ""))
    tokenizer = adapter_tokenizer(paths.adapter, recipe.model, source)

    trained_logits, probes, dequantized = (None, None, None)
    if onto:  # QLoRA: what the quantized base + adapter computed, as trained
        trained_logits, probes, dequantized = _as_trained(recipe, source, paths, tokenizer, onto)
    base = load_base_model(full_precision(recipe.model), source)
    if dequantized is not None:
        load_dequantized(base, dequantized)
        info(f"dequantized {len(dequantized)} {quantization} layers to float32: the weights the adapter was trained on")
        del dequantized
    model = load_adapter(base, paths.adapter)
    if probes is None:
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
            f"the merged model does not reproduce the adapter: max logit difference {diff:.3g} > {tolerance:.3g}; "
            "nothing was saved",
            "Check that the adapter matches the run's base model.",
        )
    # QLoRA: and it is the model that was trained (the quantized forward, within its precision).
    if onto == "quantized":
        _check_as_trained(recipe, merged_logits, trained_logits, scale)

    # 2. Cast to --dtype and save; what is checked from here on is the saved model as plain
    # transformers loads it (it keeps e.g. rotary buffers in float32, which an in-memory cast
    # does not, so the in-memory cast model is not what users get).
    if out_dtype != "float32":
        import torch

        merged = merged.to(getattr(torch, out_dtype))
        check_finite(merged, f"the merged model cast to {out_dtype}")
    merged.config.use_cache = True  # training turns the KV cache off; inference wants it
    card = partial(merged_model_card, paths, recipe, source.description, onto, out_dtype,
                   chat=trained_on_chat(paths, recipe))
    marker = {"run": str(paths.root), "base": source.description, "dtype": out_dtype, "onto": onto,
              "adapter_sha256": adapter_digest(paths.adapter)}
    saved_diff, saved_tolerance = _save_verified(merged, tokenizer, output, recipe, out_dtype, probes, reference,
                                                 scale, card, marker)
    print(f"merged model saved to {output} ({out_dtype})")
    return MergeResult(output, out_dtype, onto, diff, saved_diff, saved_tolerance)


def full_precision(model_cfg):
    """The recipe's model section for its base in float32, not quantized: what merging folds into."""
    return dataclasses.replace(model_cfg, quantization="none", dtype="float32")


def _as_trained(recipe, source, paths: RunPaths, tokenizer, onto: str):
    """The quantized base + adapter's logits on the probes (what was trained and evaluated), the
    probes, and with --onto quantized the dequantized weights to fold into."""
    quantization = recipe.model.quantization
    qbase = load_base_model(recipe.model, source)
    dequantized = None
    if onto == "quantized":
        dequantized = dequantized_weights(qbase)
        if not dequantized:
            raise MergeError(f"found no {quantization} layers in the quantized base", "Merge with --onto original.")
    qmodel = load_adapter(qbase, paths.adapter)
    probes = probe_inputs(tokenizer, qmodel.config.vocab_size)
    trained_logits = probe_logits(qmodel, probes)
    check_finite_logits(trained_logits, f"the {quantization} base + adapter")
    return trained_logits, probes, dequantized


def _check_as_trained(recipe, merged_logits: list, trained_logits: list, scale: float) -> None:
    """The merged model reproduces the quantized forward the adapter was trained with, within that
    forward's precision: the 4-bit layers compute in compute_dtype; LLM.int8 layers also quantize
    their inputs, so that forward is approximate."""
    quantization = recipe.model.quantization
    trained_dtypes = {recipe.model.dtype}  # pinned: the dtypes the run recorded (load_run_recipe)
    trained_dtypes.add(recipe.model.compute_dtype if quantization == "4bit" else "int8")
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


def _save_verified(merged, tokenizer, output: Path, recipe, out_dtype: str, probes: list, reference: list,
                   scale: float, card, marker: dict) -> tuple[float, float]:
    """Save the merged model into `output` in one atomic step, once it loads back with plain
    transformers bit for bit and within --dtype's rounding of base + adapter; its model card
    (`card(saved_diff)`) and the marker listing what `lora merge` wrote go with it. Returns the
    saved model's max logit difference and its tolerance."""
    import torch
    from transformers import AutoModelForCausalLM

    digests = tensor_digests(merged)
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
            (tmp / "README.md").write_text(card(saved_diff), encoding="utf-8")
            marker = {**marker, "files": sorted(p.name for p in tmp.iterdir())}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    except OSError as e:  # disk full, permissions changed meanwhile, ...: the old output is left as it was
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise MergeError(
            f"saving the merged model to {output} failed: {e.strerror or e}{where}; nothing was saved",
            "Free some disk space, or choose another --output DIR you can write to.",
        ) from None
    return saved_diff, saved_tolerance


# --------------------------------------------------------------------------- checks before any work


def resolve_merge_dtype(dtype: str | None, trained_dtype: str) -> str:
    """--dtype, else the dtype the run trained its base in (pinned by load_run_recipe)."""
    if dtype is not None and dtype not in DTYPES:
        raise LoraError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}",
                        "Use --dtype float32, bfloat16 or float16.")
    return dtype or trained_dtype


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
            + (
                "that run (its adapter was trained on this merge)"
                if len(users) == 1
                else "those runs (their adapters were trained on this merge)"
            ),
            f"Write the new merge elsewhere with --output DIR. To replace it anyway, delete {output} first.",
        )


def check_can_create(output: Path, what: str = "the merged model") -> None:
    """Refuse, before any work, an --output that could not be written: a file on its path, a
    directory without write permission, a read-only or special file system. Outputs are written
    beside the target first (fsutil.atomic_directory / atomic_file), so that is where we try."""
    parent = Path(os.path.abspath(output)).parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(
            f"cannot write --output {output}: {parent} is a file, not a directory",
            f"Name a place for {what} whose parents are directories (or do not exist yet).",
        )
    problem = cannot_write_in(parent, output.name or "merged")
    if problem is not None:
        raise RunDirError(
            f"cannot write --output {output}: cannot create anything in {parent} ({problem.strerror or problem})",
            "Choose a directory you can write to with --output DIR.",
        ) from None


def runs_based_on(output: Path, paths) -> list[Path]:
    """Runs (under ./runs and beside this run) whose base model is `output` or inside it: their
    adapters were trained on that model, so replacing it would change them without a word."""
    out = output.resolve()
    seen, found = set(), []
    for root in (paths.root.parent, output.parent.parent, RUNS_ROOT):
        for run in sorted(run_dirs(root)):
            if run.resolve() in seen:
                continue
            seen.add(run.resolve())
            base = run_base_path(run)
            if base is not None and base.resolve().is_relative_to(out):
                found.append(run)
    return found
