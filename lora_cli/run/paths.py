"""Where everything of a run lives: the run directory's layout, and what `lora` writes there.

    runs/<name>/
      recipe.yaml     resolved recipe          adapter/      final PEFT adapter + tokenizer
      run.json        status, versions, ...    checkpoints/  resumable Trainer checkpoints
      metrics.jsonl   one JSON line per log    merged/       `lora merge`   eval.json  `lora eval`
      loss.png        the loss curves          tensorboard/  with train.report_to: [tensorboard]
      export/         `lora export`: *.gguf files, ollama/ (Modelfile + model.gguf)

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

    @property
    def export(self) -> Path:
        return self.root / "export"


# What `lora` itself writes into a run directory (train, eval, merge); hidden temporaries of these
# (".run.json.x.tmp", ".adapter.old-1") too. Anything else was put there by someone else.
RUN_ENTRIES = ("recipe.yaml", "run.json", "metrics.jsonl", "adapter", "checkpoints", "merged", "eval.json",
               "loss.png", "tensorboard", "export")

# What `lora export` writes: GGUF files, and Ollama directories of a Modelfile beside its model.
OLLAMA_FILES = frozenset({"Modelfile", "model.gguf"})


def exported_by_lora(path: Path) -> bool:
    """A file or directory `lora export` writes (a .gguf file, or an Ollama directory holding only
    Modelfile and model.gguf), which its --overwrite and `lora train --overwrite` may replace."""
    if path.is_symlink():
        return False
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and {e.name for e in path.iterdir()} <= OLLAMA_FILES


# What the adapter save writes into adapter/: PEFT's adapter files and model card, and the
# tokenizer's files (vocabulary files differ by tokenizer type).
ADAPTER_SAVE_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
                      "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "chat_template.jinja", "chat_template.json", "additional_chat_templates", "vocab.json",
                      "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model"}

