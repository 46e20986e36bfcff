"""`lora generate`: run prompts through a run's base + adapter (or its base with --base, or any
model with --model), streaming the answers.

Prompts are formatted the way training formatted them: through the chat template (with the
recipe's system prompt) when the run trained on chat data or with --chat, otherwise as plain text.
Generated text goes to stdout, everything else (which run, which model) to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lora_cli.console import info
from lora_cli.errors import DataError, LoraError, ModelError
from lora_cli.inference.generation import (
    check_sampling,
    encode_prompt,
    generate_ids,
    generation_config,
    load_generator,
    writer_streamer,
)
from lora_cli.model.facts import model_context


def run(
    prompt: str | None,
    *,
    run: str | Path | None = None,
    model: str | None = None,
    base: bool = False,
    chat: bool | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 0,
    seed: int | None = None,
    stream: bool = True,
    as_json: bool = False,
    file: str | Path | None = None,
    stdin=None,
    stdout=None,
) -> list[dict]:
    """Generate for each prompt; print as the flags say; return one result dict per prompt."""
    stdout = stdout or sys.stdout
    if run is not None and model is not None:
        raise LoraError("--run and --model cannot be used together",
                        "--run RUN uses the run's base + adapter; --model M runs a plain model (e.g. a merged one).")
    if base and model is not None:
        raise LoraError("--base turns a run's adapter off, and --model has no adapter",
                        "Drop --base, or use --run RUN --base.")
    check_sampling(max_new_tokens, temperature, top_p, top_k)
    prompts = read_prompts(prompt, file, stdin)

    gen = load_generator(run, model)
    use_chat = gen.chat_trained if chat is None else chat
    if chat is None and not gen.has_adapter and getattr(gen.tokenizer, "chat_template", None):
        info("note: this model has a chat template; pass --chat to format the prompt with it")
    if use_chat and not getattr(gen.tokenizer, "chat_template", None):
        raise ModelError(f"--chat: the tokenizer of {gen.name} has no chat template",
                         "Drop --chat to send the prompt as plain text, or use a chat/instruct model.")
    adapter = gen.has_adapter and not base
    what = "adapter on" if adapter else ("adapter off (--base)" if gen.has_adapter else "no adapter")
    mode = (
        "greedy"
        if temperature == 0
        else f"sampling (temperature {temperature:g}, top-p {top_p:g}, top-k {top_k or 'off'})"
    )
    info(f"{what}; prompt format: {'chat template' if use_chat else 'plain text'}; {mode}")
    config = generation_config(gen, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)

    context = model_context(gen.model.config)
    results = []
    for text in prompts:
        prompt_ids = encode_prompt(
            gen.tokenizer, text, chat=use_chat, system_prompt=gen.system_prompt if use_chat else None
        )
        if not prompt_ids:  # e.g. text the tokenizer drops entirely
            raise LoraError(f"the prompt {text!r} encodes to no tokens", "Pass some text to continue.")
        if context and len(prompt_ids) + max_new_tokens > context:
            if len(prompt_ids) >= context:
                raise LoraError(
                    f"the prompt is {len(prompt_ids)} tokens, the model's context is {context}", "Shorten the prompt."
                )
            config.max_new_tokens = context - len(prompt_ids)
            info(f"note: generating at most {config.max_new_tokens} tokens (the model's context is {context})")
        else:
            config.max_new_tokens = max_new_tokens
        streaming = stream and not as_json
        streamer = writer_streamer(gen.tokenizer, stdout) if streaming else None
        started = time.perf_counter()
        new = generate_ids(gen, prompt_ids, config, adapter=adapter, seed=seed, streamer=streamer)
        seconds = time.perf_counter() - started
        output = gen.tokenizer.decode(new, skip_special_tokens=True)
        result = {
            "prompt": text,
            "output": output,
            "model": gen.name,
            "adapter": adapter,
            "tokens": len(new),
            "seconds": round(seconds, 3),
        }
        if gen.run is not None:
            result["run"] = str(gen.run)
        results.append(result)
        if as_json:
            stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
        elif not streaming:
            stdout.write(output + "\n")
        else:
            stdout.write("\n")
        stdout.flush()
    return results


def read_prompts(prompt: str | None, file: str | Path | None, stdin=None) -> list[str]:
    """PROMPT, or one prompt per non-blank line of --file / stdin (`-`)."""
    stdin = stdin or sys.stdin
    if prompt is not None and file is not None:
        raise LoraError("give either PROMPT or --file, not both", "Put all prompts in the file, one per line.")
    if prompt is None and file is None:
        raise LoraError(
            "no prompt given",
            'Pass a PROMPT ("Once upon a time"), `-` to read prompts from stdin, or --file F (one prompt per line).',
        )
    source = file if file is not None else prompt
    if prompt is not None and prompt != "-":
        if not prompt.strip():  # as blank lines of --file are skipped; "" would reach the model as no tokens
            raise LoraError("the prompt is empty", 'Pass some text to continue, e.g. "Once upon a time".')
        return [prompt]
    if str(source) == "-":
        text, where = stdin.read(), "stdin"
    else:
        path = Path(source)
        if path.is_dir():
            raise DataError(
                f"--file {path} is a directory, not a prompt file", "Name a text file with one prompt per line."
            )
        if not path.is_file():
            raise DataError(f"prompt file not found: {path}", "Check the path; the file holds one prompt per line.")
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text", "Save the prompt file as UTF-8.") from None
    prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        what = "it holds only blank lines" if text else "it is empty"
        raise DataError(f"no prompts in {where} ({what})", "Write one prompt per line.")
    return prompts
