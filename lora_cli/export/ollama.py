"""The Ollama Modelfile that goes beside an exported model.gguf (`ollama create NAME -f Modelfile`).

TEMPLATE is the run's chat format in Ollama's template language (chat_formats.py), so Ollama formats
a conversation exactly as training did; a run trained on plain text gets the raw prompt. SYSTEM is
the recipe's data.system_prompt (what training put in every example), else the default system
prompt of the model's own template. The sampling parameters are `lora generate`'s defaults, and
the stop token is the end-of-turn token, so answers end where training taught them to.
"""

from __future__ import annotations

from lora_cli.errors import ExportError
from lora_cli.export.chat_formats import DetectedChat

# `lora generate`'s defaults (cli.py), so the exported model samples as `lora generate` does.
GENERATION_DEFAULTS = {"temperature": 0.7, "top_p": 0.9}

# Ollama's own default context is small; the model's context, up to this, is set instead.
MAX_NUM_CTX = 8192


def modelfile(gguf_name: str, chat: DetectedChat | None, *, chat_trained: bool, system_prompt: str | None,
              context: int | None, run_name: str, base: str) -> str:
    lines = [
        f"# Ollama Modelfile written by `lora export` for the run {run_name} (base: {base}).",
        f"# ollama create {run_name} -f Modelfile && ollama run {run_name}",
        f"FROM ./{gguf_name}",
    ]
    system = None
    if chat_trained and chat is not None:
        lines.append(f"# chat format: {chat.format.name} (the tokenizer's chat template, as trained)")
        lines.append(f'TEMPLATE """{_quoted(chat.format.ollama_template(), "TEMPLATE")}"""')
        system = system_prompt or chat.default_system
    elif chat_trained:
        raise ExportError(
            "the run trained on chat data, but its chat template is not one `lora export` can write for Ollama "
            "(ChatML or Llama 3)",
            "Export with --format gguf: llama.cpp reads the chat template from the file itself.",
        )
    else:
        lines.append("# trained on plain text: the prompt goes to the model as it is")
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    if system:
        lines.append(f'SYSTEM """{_quoted(system, "SYSTEM")}"""')
    if chat_trained and chat is not None:
        lines.append(f'PARAMETER stop "{chat.format.end_of_turn}"')
    for key, value in GENERATION_DEFAULTS.items():
        lines.append(f"PARAMETER {key} {value:g}")
    if context:
        lines.append(f"PARAMETER num_ctx {min(context, MAX_NUM_CTX)}")
    return "\n".join(lines) + "\n"


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise ExportError(f'the {what} text contains """, which ends a Modelfile string',
                          "Remove the triple quotes from the system prompt (data.system_prompt).")
    return text
