"""`lora export`: a run's model as a GGUF file for llama.cpp / LM Studio, as an Ollama model
directory, or its adapter alone as a GGUF LoRA.

    RUN/merged (current, else merged now) ─► GGUF writer ─► read back by transformers ─► compare ─► output
    RUN/adapter ──────────────────────────► GGUF LoRA  ─► B·A vs PEFT's delta weights ──────────────► output

Nothing is left at the output unless its check passed (written beside it, then renamed).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_cli.console import human_bytes, info, quiet_libraries
from lora_cli.errors import ExportError
from lora_cli.export.architectures import model_shape
from lora_cli.export.chat_formats import detect_chat_format
from lora_cli.export.gguf_files import check_adapter_config, write_adapter_gguf, write_model_gguf
from lora_cli.export.kquants import quantize_with_llama_cpp, require_llama_quantize
from lora_cli.export.merge import check_can_create, full_precision, merge_run
from lora_cli.export.ollama import modelfile
from lora_cli.export.quant_types import DEFAULT_QUANT, K_QUANTS, WRITTEN_HERE, all_quants
from lora_cli.export.verify import check_adapter_gguf, check_model_gguf
from lora_cli.export.vocab import check_tokenizer
from lora_cli.fsutil import atomic_directory, atomic_file
from lora_cli.model.adapters import load_adapter
from lora_cli.model.facts import load_model_config, model_context
from lora_cli.model.loading import load_base_model
from lora_cli.model.sources import resolve_model_source
from lora_cli.run.lookup import resolve_run
from lora_cli.run.merged import why_not_current
from lora_cli.run.paths import RunPaths, exported_by_lora
from lora_cli.run.recipes import load_run_recipe, trained_on_chat

FORMATS = ("gguf", "ollama")
ADAPTER_QUANTS = ("f32", "f16", "bf16", "q8_0")
GGUF_MAGIC = b"GGUF"


@dataclass
class ExportResult:
    run: str
    format: str
    quant: str
    output: str
    bytes: int
    adapter_only: bool
    check: dict = field(default_factory=dict)
    modelfile: str | None = None


def run(
    run: str | Path | None,
    *,
    format: str = "gguf",
    quant: str | None = None,
    adapter_only: bool = False,
    output: str | Path | None = None,
    overwrite: bool = False,
    as_json: bool = False,
) -> ExportResult:
    quant = check_options(format, quant, adapter_only)
    binary = require_llama_quantize(quant) if quant in K_QUANTS else None
    paths = resolve_run(run)
    recipe = load_run_recipe(paths)
    output = Path(output) if output is not None else default_output(paths, format, quant, adapter_only)
    check_output(output, paths, format, overwrite=overwrite)
    base_config = load_model_config(recipe.model)
    model_shape(base_config)  # an unsupported architecture says so before any work
    if adapter_only:
        check_adapter_config(paths.adapter, base_config)
    else:
        check_tokenizer(paths.adapter)  # the adapter keeps the tokenizer the merged model gets
    # The Modelfile first (from the adapter's tokenizer, which the merged model keeps): a chat
    # format Ollama cannot be given is said before the merge, not after it.
    text = _modelfile_text(paths, recipe, base_config) if format == "ollama" else None

    quiet_libraries()
    # With --json, stdout carries the result alone; the merge's report goes to stderr with ours.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        if adapter_only:
            result = _export_adapter(paths, recipe, output, quant)
        else:
            result = _export_model(paths, recipe, output, format, quant, binary, text)
    if as_json:
        sys.stdout.write(json.dumps(asdict(result), indent=2) + "\n")
    else:
        _print_next_steps(result, paths, recipe)
    return result


def check_options(format: str, quant: str | None, adapter_only: bool) -> str:
    """The quant to write; exit 2 for a combination that cannot be exported."""
    if format not in FORMATS:
        raise ExportError(f"--format {format} is not one of {', '.join(FORMATS)}",
                          "Use --format gguf (one file for llama.cpp) or --format ollama (a Modelfile beside it).")
    if quant is not None:
        quant = quant.lower()
        if quant not in all_quants():
            raise ExportError(f"--quant {quant} is not one of {', '.join(all_quants())}",
                              f"Written by lora: {', '.join(WRITTEN_HERE)}; k-quants need llama.cpp's llama-quantize.")
    if adapter_only:
        if format != "gguf":
            raise ExportError("--adapter-only writes a GGUF LoRA file; Ollama gets the whole model",
                              "Use --format gguf --adapter-only, or --format ollama without --adapter-only.")
        quant = quant or "f32"
        if quant not in ADAPTER_QUANTS:
            raise ExportError(f"--adapter-only --quant {quant}: llama.cpp applies LoRA files in "
                              f"{', '.join(ADAPTER_QUANTS)} only", "Use --quant f32 (the default) or f16.")
        return quant
    return quant or DEFAULT_QUANT


def default_output(paths: RunPaths, format: str, quant: str, adapter_only: bool) -> Path:
    name = paths.root.resolve().name
    if format == "ollama":
        return paths.export / "ollama"
    return paths.export / f"{name}-{'adapter-' if adapter_only else ''}{quant}.gguf"


def check_output(output: Path, paths: RunPaths, format: str, *, overwrite: bool) -> None:
    """Refuse, before any work, an output that would replace something that is not an earlier export."""
    out, root = output.resolve(), paths.root.resolve()
    if out == root or root.is_relative_to(out) or any(
            out.is_relative_to(root / d) for d in ("adapter", "checkpoints", "merged")):
        raise ExportError(f"--output {output} would replace the run (or its adapter, checkpoints or merged model)",
                          f"Write the export elsewhere, e.g. {default_output(paths, format, DEFAULT_QUANT, False)}.")
    if format == "gguf" and output.suffix != ".gguf":
        example = output.with_suffix(".gguf") if output.suffix else output / "model.gguf"
        raise ExportError(f"--output {output}: a GGUF file's name ends in .gguf", f"Name the file, e.g. -o {example}.")
    if output.exists() or output.is_symlink():
        if format == "gguf" and output.is_dir():
            raise ExportError(f"--output {output} is a directory", "Name the .gguf file to write.")
        if format == "ollama" and not output.is_dir():
            raise ExportError(f"--output {output} is a file", "--format ollama writes a directory: name one.")
        empty_dir = output.is_dir() and not any(output.iterdir())
        if not empty_dir and not overwrite:
            raise ExportError(f"{output} already exists", "Pass --overwrite to replace it, or -o to write elsewhere.")
        if not empty_dir and not _written_by_export(output):
            raise ExportError(f"{output} is not an earlier `lora export` output; refusing to replace it",
                              "--overwrite replaces only a GGUF file or an Ollama directory lora wrote: "
                              "choose another -o.")
    check_can_create(output, "the export")


def _written_by_export(path: Path) -> bool:
    if not exported_by_lora(path):
        return False
    file = path if path.is_file() else path / "model.gguf"
    try:
        with open(file, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return not file.exists()  # an Ollama directory whose model was removed


# --------------------------------------------------------------------------- the merged model


@contextlib.contextmanager
def merged_model_dir(paths: RunPaths):
    """RUN/merged when it is a merge of the current adapter; else a merge made now (into RUN/merged
    when there is none, so the next export reuses it; beside it when an older one is there)."""
    if paths.merged.is_dir() and any(paths.merged.iterdir()):
        reason = why_not_current(paths.merged, paths.adapter)
        if reason is None:
            info(f"using the merged model {paths.merged} (made from the current adapter)")
            yield paths.merged
            return
        info(f"{paths.merged} cannot be used ({reason}): merging afresh into a temporary directory "
             f"(run `lora merge --overwrite` to replace it)")
        scratch = Path(tempfile.mkdtemp(prefix=".export-merge-", dir=paths.root))
        try:
            merge_run(paths.root, output=scratch / "merged")
            yield scratch / "merged"
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    info(f"no merged model yet: merging first (as `lora merge` does) into {paths.merged}")
    merge_run(paths.root)
    yield paths.merged


def _modelfile_text(paths: RunPaths, recipe, base_config) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths.adapter)
    return modelfile("model.gguf", detect_chat_format(tokenizer), chat_trained=trained_on_chat(paths, recipe),
                     system_prompt=recipe.data.system_prompt, context=model_context(base_config),
                     run_name=paths.root.resolve().name, base=recipe.model.name)


def _export_model(paths: RunPaths, recipe, output: Path, format: str, quant: str, binary: str | None,
                  text: str | None) -> ExportResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with merged_model_dir(paths) as merged_dir:
        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
        model.eval()
        chat = detect_chat_format(tokenizer)
        name = paths.root.resolve().name
        written_to = output / "model.gguf" if format == "ollama" else output
        info(f"writing {written_to} ({quant}) and checking it against the merged model ...")
        with _atomic_output(output, format) as target:
            gguf_path = target / "model.gguf" if format == "ollama" else target
            _write_model(gguf_path, model, tokenizer, merged_dir, quant, binary, name=name, chat=chat,
                         description=f"LoRA fine-tune of {recipe.model.name} (lora run {name})")
            # (the base is passed, not kept here: the check frees it before reading the file back)
            base = full_precision(recipe.model)
            check = check_model_gguf(gguf_path, model, tokenizer, quant,
                                     base=load_base_model(base, resolve_model_source(base)))
            if text is not None:
                (target / "Modelfile").write_text(text, encoding="utf-8")
            size = gguf_path.stat().st_size
    print(f"check: {check.describe()}", file=sys.stderr)
    if check.warning():
        info(f"warning: {check.warning()}")
    return ExportResult(str(paths.root), format, quant, str(written_to), size, False, asdict(check), text)


@contextlib.contextmanager
def _atomic_output(output: Path, format: str):
    if format == "ollama":
        with atomic_directory(output) as tmp:
            yield tmp
    else:
        with atomic_file(output, suffix=".gguf") as tmp:
            yield tmp


def _write_model(path: Path, model, tokenizer, model_dir: Path, quant: str, binary: str | None, **meta) -> None:
    if binary is None:
        write_model_gguf(path, model, tokenizer, model_dir, quant, **meta)
        return
    f16 = path.with_name(path.name + ".f16.gguf")
    try:
        write_model_gguf(f16, model, tokenizer, model_dir, "f16", **meta)
        info(f"running llama-quantize ({quant}) ...")
        quantize_with_llama_cpp(binary, f16, path, quant)
    finally:
        f16.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the adapter alone


def _export_adapter(paths: RunPaths, recipe, output: Path, quant: str) -> ExportResult:
    source = resolve_model_source(recipe.model)
    base = load_base_model(full_precision(recipe.model), source)
    shape = model_shape(base.config)
    info(f"writing the adapter {output} ({quant}) and checking it against PEFT's delta weights ...")
    with atomic_file(output, suffix=".gguf") as tmp:
        written = write_adapter_gguf(tmp, paths.adapter, base.config, quant, name=paths.root.resolve().name)
        peft_model = load_adapter(base, paths.adapter)
        check = check_adapter_gguf(tmp, peft_model, shape, quant)
        size = tmp.stat().st_size
    print(f"check: {check.pairs} LoRA pairs; B·A·alpha/r matches PEFT's delta weights within "
          f"{check.max_relative_diff:.2g} of their scale (alpha {written.alpha:g}, rank {written.rank})",
          file=sys.stderr)
    return ExportResult(str(paths.root), "gguf", quant, str(output), size, True,
                        {"pairs": check.pairs, "max_relative_diff": check.max_relative_diff,
                         "alpha": written.alpha, "rank": written.rank})


def _print_next_steps(result: ExportResult, paths: RunPaths, recipe) -> None:
    print(f"exported {result.output} ({result.quant}, {human_bytes(result.bytes)})")
    if result.adapter_only:
        base = recipe.model.name
        print(f"use it with a GGUF of its base ({base}): llama-cli -m BASE.gguf --lora {result.output}")
        return
    if result.format == "ollama":
        directory = Path(result.output).parent
        name = paths.root.resolve().name
        print(f"next: cd {directory} && ollama create {name} -f Modelfile && ollama run {name}")
    else:
        print(f"next: llama-cli -m {result.output} -cnv   (or: llama-server -m {result.output})")
