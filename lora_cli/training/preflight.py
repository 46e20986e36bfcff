"""What a recipe asks of the training environment, checked before any model is loaded: the
tracker packages it names are installed, and the settings this run cannot act on are said, not
silently dropped (`lora train` and `lora validate` both print them).
"""

from __future__ import annotations

import importlib.util
import math
import sys

from lora_cli.errors import RecipeError
from lora_cli.recipe.schema import Recipe
from lora_cli.training.evaluation import unused_eval_settings
from lora_cli.training.optimizers import optimizer_notes

# report_to name -> the package the transformers callback needs
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(recipe: Recipe) -> None:
    """Fail before any model is loaded when a tracker in train.report_to is not installed."""
    missing = [name for name in recipe.train.report_to if not _installed(TRACKER_PACKAGES[name])]
    if missing:
        raise RecipeError(
            "train.report_to",
            [f"{name} is listed but the '{TRACKER_PACKAGES[name]}' package is not installed" for name in missing],
            f"pip install {' '.join(TRACKER_PACKAGES[n] for n in missing)}  (or remove it from train.report_to)",
        )


def _installed(package: str) -> bool:
    if package in sys.modules:  # None there means "import blocked"
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def ignored_settings(recipe: Recipe, data) -> list[str]:
    """Settings this run cannot act on: said, not silently dropped (also by `lora validate`)."""
    notes = []
    if recipe.train.eval_every and not data.validation:
        notes.append(
            "train.eval_every is set but there is no validation data (data.validation or "
            "data.val_split): nothing will be evaluated"
        )
    if recipe.data.train_on_prompt and data.report.format == "text":
        notes.append("data.train_on_prompt does nothing for text data: every token is trained on already")
    notes += unused_eval_settings(recipe, bool(data.validation))
    notes += optimizer_notes(recipe)
    t = recipe.train
    if (t.early_stopping_patience or t.keep_best) and not t.eval_every and t.max_steps:
        per_epoch = math.ceil(len(data.train) / (t.batch_size * t.grad_accum))
        if t.max_steps < per_epoch:  # evaluations come at the end of each epoch: none before the end
            keys = " and ".join(k for k, v in (("early_stopping_patience", t.early_stopping_patience),
                                                ("keep_best", t.keep_best)) if v)
            notes.append(f"train.{keys} act on evaluations during training, and there is none: "
                         f"train.max_steps {t.max_steps} ends the run within its first epoch "
                         f"({per_epoch} steps); set train.eval_every")
    return notes
