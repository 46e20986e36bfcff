"""README.md model cards in Hugging Face style: one for a trained adapter (adapter/README.md), one
for a merged model (merged/README.md).

The adapter's card has the YAML front matter the Hub expects (base_model, library_name: peft, tags),
then what a reader needs: the base, the data, the recipe, the trainable parameters, the final
metrics, and how to load and merge it. It is written inside the adapter's atomic directory, so an
adapter never exists without its card.
"""

from __future__ import annotations

import yaml

from lora_cli.model.sources import hub_model_id
from lora_cli.recipe.schema import Recipe
from lora_cli.run.merged import CARD_MARK
from lora_cli.run.paths import RunPaths


def adapter_model_card(recipe: Recipe, *, run_name: str, report, trainable: int, total: int, final: dict,
                       source_description: str) -> str:
    base = hub_model_id(recipe.model.name)
    quantized = recipe.model.quantization != "none"
    tags = ["lora", "peft", "lora-cli", "qlora" if recipe.model.quantization == "4bit" else "sft"]
    if recipe.train.method != "sft":  # dpo / orpo: preference tuning (docs/preference.md)
        tags[-1:] = [tags[-1], recipe.train.method] if tags[-1] == "qlora" else [recipe.train.method]
    front = {"base_model": base, "library_name": "peft", "pipeline_tag": "text-generation", "tags": tags}
    m, lo, t = recipe.model, recipe.lora, recipe.train
    targets = lo.target_modules if isinstance(lo.target_modules, str) else ", ".join(lo.target_modules)
    sources = ", ".join(report.sources)
    share = report.supervised_tokens / report.train_tokens if report.train_tokens else 0.0
    metrics = [f"| final train loss | {final['train_loss']:.4f} |", f"| steps | {final.get('global_step')} |"]
    if "eval_loss" in final:
        metrics.insert(1, f"| final eval loss | {final['eval_loss']:.4f} |")
    if final.get("stopped_early"):
        metrics.append("| stopped early | eval loss no longer improving (train.early_stopping_patience) |")
    if "best_step" in final:  # train.keep_best: this adapter is that step's, the eval loss above its
        metrics.append(f"| adapter from step | {final['best_step']} (lowest eval loss; train.keep_best) |")
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
        f"- dtype {m.dtype}"
        + (f", quantized {m.quantization} ({m.quant_type}) during training (QLoRA)" if quantized else ""),
        "",
        "## Data",
        "",
        f"- {sources}: {report.rows} rows, format `{report.format}`",
        f"- {report.train_rows} training examples, {report.train_tokens} tokens, "
        f"{report.supervised_tokens} supervised ({share:.0%}); max_length {report.max_length}"
        + (f", packed into {report.packed_rows} rows" if report.packed_rows is not None else ""),
        f"- validation: {report.validation_rows} examples from {report.validation_from}"
        if report.validation_from
        else "- validation: none",
        "",
        "## Recipe",
        "",
        f"- LoRA r={lo.r}, alpha={lo.alpha:g}, dropout={lo.dropout:g}, target_modules: {targets}"
        + (", DoRA" if lo.use_dora else "")
        + (", rsLoRA" if lo.use_rslora else ""),
        f"- trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(1, total):.2f}%)",
        f"- {t.max_steps or '-'} max steps / {t.epochs:g} epochs, batch {t.batch_size} x grad_accum {t.grad_accum}, "
        f"lr {t.lr:g} ({t.scheduler}), seed {t.seed}",
        *([f"- method {t.method} (TRL), beta {t.beta:g}: preference pairs; the reference is the base, adapter off"]
          if t.method != "sft" else []),
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


def merged_model_card(
    paths: RunPaths, recipe: Recipe, base: str, onto: str | None, dtype: str, diff: float, *, chat: bool
) -> str:
    """`chat`: the run trained on chat data (its prompts go through the chat template)."""
    prompt_format = (
        "chat template (trained on chat data: `lora generate --chat --model DIR PROMPT`)" if chat else "plain text"
    )
    how = {
        None: "into the full-precision base",
        "quantized": f"into the {recipe.model.quantization} base weights as they dequantize "
                     "(what the adapter was trained on)",
        "original": "into the original full-precision base weights (not the quantized weights it was trained on)",
    }[onto]
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
