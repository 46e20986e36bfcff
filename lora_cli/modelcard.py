"""adapter/README.md: a Hugging Face style model card for the trained adapter.

YAML front matter (base_model, library_name: peft, tags) as the Hub expects, then what a reader
needs: the base, the data, the recipe, the trainable parameters, the final metrics, and how to
load and merge the adapter. Written inside the adapter's atomic directory, so an adapter never
exists without its card.
"""

from __future__ import annotations

import yaml

from lora_cli.config import Recipe


def _base_model_id(recipe: Recipe) -> str:
    """The id users would pass to from_pretrained: a built-in name maps to its hub id."""
    from lora_cli.model import BUILTIN_MODELS

    builtin = BUILTIN_MODELS.get(recipe.model.name.lower())
    return builtin.hub_id if builtin else recipe.model.name


def model_card(recipe: Recipe, *, run_name: str, report, trainable: int, total: int, final: dict,
               source_description: str) -> str:
    base = _base_model_id(recipe)
    quantized = recipe.model.quantization != "none"
    tags = ["lora", "peft", "lora-cli", "qlora" if recipe.model.quantization == "4bit" else "sft"]
    front = {"base_model": base, "library_name": "peft", "pipeline_tag": "text-generation", "tags": tags}
    m, lo, t = recipe.model, recipe.lora, recipe.train
    targets = lo.target_modules if isinstance(lo.target_modules, str) else ", ".join(lo.target_modules)
    sources = ", ".join(report.sources)
    share = report.supervised_tokens / report.train_tokens if report.train_tokens else 0.0
    metrics = [f"| final train loss | {final['train_loss']:.4f} |", f"| steps | {final.get('global_step')} |"]
    if "eval_loss" in final:
        metrics.insert(1, f"| final eval loss | {final['eval_loss']:.4f} |")
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {run_name}: a LoRA adapter for {base}",
        "",
        f"Trained with the `lora` command line (`lora train`, LoRA via peft) on {sources}.",
        "",
        "## Base model",
        "",
        f"- `{base}` (loaded from {source_description})",
        f"- dtype {m.dtype}" + (f", quantized {m.quantization} ({m.quant_type}) during training (QLoRA)" if quantized else ""),
        "",
        "## Data",
        "",
        f"- {sources}: {report.rows} rows, format `{report.format}`",
        f"- {report.train_rows} training examples, {report.train_tokens} tokens, "
        f"{report.supervised_tokens} supervised ({share:.0%}); max_length {report.max_length}"
        + (f", packed into {report.packed_rows} rows" if report.packed_rows is not None else ""),
        f"- validation: {report.validation_rows} examples from {report.validation_from}" if report.validation_from
        else "- validation: none",
        "",
        "## Recipe",
        "",
        f"- LoRA r={lo.r}, alpha={lo.alpha:g}, dropout={lo.dropout:g}, target_modules: {targets}"
        + (", DoRA" if lo.use_dora else "") + (", rsLoRA" if lo.use_rslora else ""),
        f"- trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(1, total):.2f}%)",
        f"- {t.max_steps or '-'} max steps / {t.epochs:g} epochs, batch {t.batch_size} x grad_accum {t.grad_accum}, "
        f"lr {t.lr:g} ({t.scheduler}), seed {t.seed}",
        "- the full resolved recipe is `recipe.yaml` in the run directory",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        *metrics,
        "",
        "## Use it",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/adapter")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/adapter")',
        "```",
        "",
        "With the lora CLI:",
        "",
        "```",
        f'lora generate "your prompt" --run runs/{run_name}',
        f"lora merge runs/{run_name}      # fold the adapter into the base: runs/{run_name}/merged",
        "```",
        "",
    ]
    return "\n".join(lines)
