"""`lora generate`: run a prompt through a run's base + adapter (or the base alone, or any model).

The adapter is loaded onto the base exactly as it was trained (same dtype, same 4-bit/8-bit
quantization) and `--base` switches it off with peft's `disable_adapter()` on the same loaded
model, so base and adapter answers differ only by the adapter.

Prompts are formatted the way training formatted them: through the chat template (with the
recipe's system prompt) when the run trained on chat data or with --chat, otherwise as plain
text. Generated text goes to stdout, everything else (which run, which model) to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lora_cli.errors import EXIT_RUNTIME, DataError, LoraError, ModelError


class NonFiniteOutput(LoraError):
    """The model's logits went NaN/inf while generating (a diverged adapter): a run-time failure."""

    exit_code = EXIT_RUNTIME


@dataclass
class Generator:
    """A loaded model ready to answer prompts."""

    model: object
    tokenizer: object
    name: str  # the base model (or --model) as the user named it
    run: Path | None
    has_adapter: bool
    chat_trained: bool  # the run trained on chat data
    system_prompt: str | None  # the recipe's data.system_prompt


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- prompts


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
            raise DataError(f"--file {path} is a directory, not a prompt file", "Name a text file with one prompt per line.")
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


def _special_suffix(tokenizer) -> int:
    """Tokens the tokenizer appends after the text (an EOS with some); training cut them off too."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return len(full) - start - len(plain)
    return 0


def encode_prompt(tokenizer, prompt: str, *, chat: bool, system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt, formatted as training formatted prompts."""
    if chat:
        messages = [{"role": "user", "content": prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            text = text[0]
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(prompt)["input_ids"])
    cut = _special_suffix(tokenizer)
    return ids[: len(ids) - cut]


# --------------------------------------------------------------------------- loading


def trained_on_chat(paths, recipe) -> bool:
    """Did the run train on chat rows? run.json says which format was used; else the recipe/data."""
    from lora_cli.runs import read_run_json

    try:
        fmt = read_run_json(paths).get("data", {}).get("report", {}).get("format")
    except LoraError:
        fmt = None
    if fmt:
        return fmt == "chat"
    if recipe.data.format != "auto":
        return recipe.data.format == "chat"
    from lora_cli.data import load_records

    try:
        first = load_records(recipe.data.train)[0]
    except LoraError:
        return False
    return "messages" in first


def load_generator(run: str | Path | None, model: str | None) -> Generator:
    """The run's base + adapter (default: the latest run), or a plain model with --model."""
    from lora_cli.train import quiet_libraries

    quiet_libraries()
    from lora_cli.model import load_adapter, load_base_model, resolve_model_source

    if model is not None:
        return _load_plain(model)
    from lora_cli.merge import adapter_tokenizer
    from lora_cli.runs import load_run_recipe, resolve_run

    paths = resolve_run(run)
    recipe = load_run_recipe(paths)
    source = resolve_model_source(recipe.model)
    tokenizer = adapter_tokenizer(paths, recipe, source)
    base = load_base_model(recipe.model, source)
    peft_model = load_adapter(base, paths.adapter)
    _to_device(peft_model, quantized=recipe.model.quantization != "none")
    peft_model.eval()
    quant = f", {recipe.model.quantization}" if recipe.model.quantization != "none" else ""
    info(f"run: {paths.root}  base: {source.description}{quant}")
    return Generator(peft_model, tokenizer, recipe.model.name, paths.root, True,
                     trained_on_chat(paths, recipe), recipe.data.system_prompt)


def _load_plain(name: str) -> Generator:
    from lora_cli.config import ModelConfig
    from lora_cli.model import load_base_model, load_tokenizer, resolve_model_source

    path = Path(name).expanduser()
    if (path / "adapter_config.json").is_file() or (path / "recipe.yaml").is_file():
        what = "an adapter" if (path / "adapter_config.json").is_file() else "a run directory"
        raise ModelError(f"--model {name} is {what}, not a model", f"Use --run {path.parent if what == 'an adapter' else path} "
                         "to run the base with its adapter (or `lora merge` it first).")
    cfg = ModelConfig(name=name)
    try:
        source = resolve_model_source(cfg)
        tokenizer = load_tokenizer(cfg, source)
        model = load_base_model(cfg, source)
    except ModelError as e:  # the messages name the recipe key; here it is a flag
        raise ModelError(e.message.replace("model.name", "--model", 1), e.hint) from None
    _to_device(model, quantized=False)
    model.eval()
    info(f"model: {source.description}")
    return Generator(model, tokenizer, name, None, False, False, None)


def _to_device(model, *, quantized: bool) -> None:
    import torch

    if torch.cuda.is_available() and not quantized:  # quantized bases are placed when loaded
        model.to("cuda")


# --------------------------------------------------------------------------- generating


def generation_config(gen: Generator, *, max_new_tokens: int, temperature: float, top_p: float, top_k: int):
    """Our flags on top of the model's special tokens; greedy when temperature is 0."""
    from transformers import GenerationConfig

    tok = gen.tokenizer
    eos = []
    for value in (getattr(gen.model.generation_config, "eos_token_id", None), tok.eos_token_id):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in eos:
                eos.append(int(token))
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if temperature > 0 else {"do_sample": False}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos or None,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else None),
        bos_token_id=getattr(gen.model.generation_config, "bos_token_id", None),
        **sampling,
    )


def make_streamer(tokenizer, out):
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        """Writes finished pieces of text to `out` as they come; the prompt is not echoed."""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text)
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate_ids(gen: Generator, prompt_ids: list[int], config, *, adapter: bool, seed: int | None, streamer=None) -> list[int]:
    """The new token ids (EOS included if the model stopped there)."""
    import contextlib

    import torch
    from transformers import LogitsProcessorList, set_seed

    device = next(gen.model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    if seed is not None:
        set_seed(seed)
    off = gen.model.disable_adapter() if (gen.has_adapter and not adapter) else contextlib.nullcontext()
    with off, torch.no_grad():
        out = gen.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=streamer,
            logits_processor=LogitsProcessorList([FiniteLogits(adapter)]),
        )
    return out[0, len(prompt_ids):].tolist()


class FiniteLogits:
    """A logits processor that stops generation at the first NaN/+inf logit: sampling would die in
    torch.multinomial with a traceback, and greedy would silently emit the NaN's token id. It runs
    after top-k/top-p, which set -inf on purpose, so only rows with no finite logit at all count."""

    def __init__(self, adapter: bool):
        self.adapter = adapter

    def __call__(self, input_ids, scores):
        import torch

        if torch.isnan(scores).any() or torch.isposinf(scores).any() or not torch.isfinite(scores).any(-1).all():
            if self.adapter:
                raise NonFiniteOutput(
                    "the adapter's outputs are not finite (NaN or inf): the adapter is broken (its training diverged)",
                    "Retrain with a lower train.lr; --base runs the base model without the adapter.",
                )
            raise NonFiniteOutput("the model's outputs are not finite (NaN or inf)",
                                  "Its weights may be broken, or overflow in their dtype.")
        return scores


def run_generate(
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
    _check_sampling(max_new_tokens, temperature, top_p, top_k)
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
    mode = "greedy" if temperature == 0 else f"sampling (temperature {temperature:g}, top-p {top_p:g}, top-k {top_k or 'off'})"
    info(f"{what}; prompt format: {'chat template' if use_chat else 'plain text'}; {mode}")
    config = generation_config(gen, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)

    context = context_length(gen.model)
    results = []
    for text in prompts:
        prompt_ids = encode_prompt(gen.tokenizer, text, chat=use_chat, system_prompt=gen.system_prompt if use_chat else None)
        if not prompt_ids:  # e.g. text the tokenizer drops entirely
            raise LoraError(f"the prompt {text!r} encodes to no tokens", "Pass some text to continue.")
        if context and len(prompt_ids) + max_new_tokens > context:
            if len(prompt_ids) >= context:
                raise LoraError(f"the prompt is {len(prompt_ids)} tokens, the model's context is {context}",
                                "Shorten the prompt.")
            config.max_new_tokens = context - len(prompt_ids)
            info(f"note: generating at most {config.max_new_tokens} tokens (the model's context is {context})")
        else:
            config.max_new_tokens = max_new_tokens
        streaming = stream and not as_json
        streamer = make_streamer(gen.tokenizer, stdout) if streaming else None
        started = time.perf_counter()
        new = generate_ids(gen, prompt_ids, config, adapter=adapter, seed=seed, streamer=streamer)
        seconds = time.perf_counter() - started
        output = gen.tokenizer.decode(new, skip_special_tokens=True)
        result = {"prompt": text, "output": output, "model": gen.name, "adapter": adapter,
                  "tokens": len(new), "seconds": round(seconds, 3)}
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


def context_length(model) -> int | None:
    """The most positions the model can take (prompt + generated), when its config says."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    problems = []
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:
        problems.append(f"--temperature must be 0 (greedy) or more, got {temperature}")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {top_p}")
    if top_k < 0:
        problems.append(f"--top-k must be 0 (off) or more, got {top_k}")
    if problems:
        raise LoraError("; ".join(problems), "See `lora generate --help`.")
