"""Where everything of a run lives: the run directory's layout, and what `lora` writes there.

    runs/<name>/
      recipe.yaml     resolved recipe          adapter/      final PEFT adapter + tokenizer
      run.json        status, versions, ...    checkpoints/  resumable Trainer checkpoints
      metrics.jsonl   one JSON line per log    merged/       `lora merge`   eval.json  `lora eval`
      loss.png        the loss curves          tensorboard/  with train.report_to: [tensorboard]

docs/reliability.md states what `lora` promises about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUNS_ROOT = Path("runs")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


# What `lora` itself writes into a run directory (train, eval, merge); hidden temporaries of these
# (".run.json.x.tmp", ".adapter.old-1") too. Anything else was put there by someone else.
RUN_ENTRIES = ("recipe.yaml", "run.json", "metrics.jsonl", "adapter", "checkpoints", "merged", "eval.json",
               "loss.png", "tensorboard")


# What the adapter save writes into adapter/: PEFT's adapter files and model card, and the
# tokenizer's files (vocabulary files differ by tokenizer type).
ADAPTER_SAVE_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
                      "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "chat_template.jinja", "chat_template.json", "additional_chat_templates", "vocab.json",
                      "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model"}

