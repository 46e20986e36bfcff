"""Evaluation during training: which validation rows it reads (eval.max_rows: the first N) and
in what batches (eval.batch_size; the Trainer's per_device_eval_batch_size, training/arguments.py).
The final eval loss in run.json is measured on the same rows."""

from __future__ import annotations

from lora_cli.recipe.schema import Recipe


def evaluation_rows(recipe: Recipe, validation: list[dict] | None) -> tuple[list[dict] | None, str | None]:
    """The validation rows the Trainer evaluates on, and the line that says what they are."""
    if not validation:
        return validation, None
    e, t = recipe.eval, recipe.train
    rows = validation[: e.max_rows] if e.max_rows else validation
    cut = f" (the first {len(rows)} of {len(validation)}: eval.max_rows)" if len(rows) < len(validation) else ""
    when = f"every {t.eval_every} steps" if t.eval_every else "at the end of each epoch"
    return rows, f"eval: {len(rows)} validation rows{cut} in batches of {e.batch_size or t.batch_size}, {when}"


def unused_eval_settings(recipe: Recipe, has_validation: bool) -> list[str]:
    """eval.* keys set for a run that has nothing to evaluate."""
    if has_validation:
        return []
    keys = [f"eval.{k}" for k in ("batch_size", "max_rows") if getattr(recipe.eval, k) is not None]
    if not keys:
        return []
    return [f"{' and '.join(keys)} {'is' if len(keys) == 1 else 'are'} set but there is no validation data "
            "(data.validation or data.val_split): nothing will be evaluated"]
