"""Generating text from a run's base + adapter (or the base alone, or any model), formatted the
way training formatted prompts.

The adapter is loaded onto the base exactly as it was trained (same dtype, same 4-bit/8-bit
quantization); generating with `adapter=False` switches it off with peft's `disable_adapter()` on
the same loaded model, so base and adapter answers differ only by the adapter.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from lora_cli.console import info, quiet_libraries
from lora_cli.data.tokenize import special_suffix
from lora_cli.errors import LoraError, ModelError, NonFiniteOutput
from lora_cli.model.adapters import load_adapter
from lora_cli.model.loading import adapter_tokenizer, load_base_model, load_tokenizer, place_for_inference
from lora_cli.model.sources import resolve_model_source
from lora_cli.recipe.schema import ModelConfig
from lora_cli.run.lookup import resolve_run
from lora_cli.run.recipes import load_run_recipe, trained_on_chat


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


# --------------------------------------------------------------------------- loading


def load_generator(run: str | Path | None, model: str | None) -> Generator:
    """The run's base + adapter (default: the latest run), or a plain model with --model."""
    quiet_libraries()
    if model is not None:
        return _load_plain(model)
    paths = resolve_run(run)
    recipe = load_run_recipe(paths)
    source = resolve_model_source(recipe.model)
    tokenizer = adapter_tokenizer(paths.adapter, recipe.model, source)
    base = load_base_model(recipe.model, source)
    peft_model = load_adapter(base, paths.adapter)
    place_for_inference(peft_model, quantized=recipe.model.quantization != "none")
    peft_model.eval()
    quant = f", {recipe.model.quantization}" if recipe.model.quantization != "none" else ""
    info(f"run: {paths.root}  base: {source.description}{quant}")
    return Generator(peft_model, tokenizer, recipe.model.name, paths.root, True,
                     trained_on_chat(paths, recipe), recipe.data.system_prompt)


def _load_plain(name: str) -> Generator:
    path = Path(name).expanduser()
    if (path / "adapter_config.json").is_file() or (path / "recipe.yaml").is_file():
        what = "an adapter" if (path / "adapter_config.json").is_file() else "a run directory"
        raise ModelError(
            f"--model {name} is {what}, not a model",
            f"Use --run {path.parent if what == 'an adapter' else path} "
            "to run the base with its adapter (or `lora merge` it first).",
        )
    cfg = ModelConfig(name=name)
    try:
        source = resolve_model_source(cfg)
        tokenizer = load_tokenizer(cfg, source)
        model = load_base_model(cfg, source)
    except ModelError as e:  # the messages name the recipe key; here it is a flag
        raise ModelError(e.message.replace("model.name", "--model", 1), e.hint) from None
    place_for_inference(model, quantized=False)
    model.eval()
    info(f"model: {source.description}")
    return Generator(model, tokenizer, name, None, False, False, None)


# --------------------------------------------------------------------------- generating


def encode_prompt(tokenizer, prompt: str, *, chat: bool, system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt, formatted as training formatted prompts (data/tokenize.py)."""
    if chat:
        messages = [{"role": "user", "content": prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            text = text[0]
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(prompt)["input_ids"])
    cut = special_suffix(tokenizer)
    return ids[: len(ids) - cut]


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
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


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends an answer: the model's generation config's (a chat model's
    end-of-turn among them) and the tokenizer's EOS."""
    eos = []
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in eos:
                eos.append(int(token))
    return eos


def generation_config(gen: Generator, *, max_new_tokens: int, temperature: float, top_p: float, top_k: int):
    """Our flags on top of the model's special tokens; greedy when temperature is 0."""
    from transformers import GenerationConfig

    tok = gen.tokenizer
    eos = eos_token_ids(gen.model, tok)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
        if temperature > 0
        else {"do_sample": False}
    )
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos or None,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else None),
        bos_token_id=getattr(gen.model.generation_config, "bos_token_id", None),
        **sampling,
    )


def writer_streamer(tokenizer, out):
    """transformers' TextStreamer, writing finished pieces of text to `out` as they come (not to
    stdout with print); the prompt is not echoed."""
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def write(text: str, stream_end: bool = False) -> None:
        out.write(text)
        out.flush()

    streamer.on_finalized_text = write  # the hook TextStreamer documents for where text goes
    return streamer


def generate_ids(
    gen: Generator, prompt_ids: list[int], config, *, adapter: bool, seed: int | None, streamer=None
) -> list[int]:
    """The new token ids (EOS included if the model stopped there)."""
    import torch
    from transformers import LogitsProcessorList, set_seed

    device = next(gen.model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    if seed is not None:
        set_seed(seed)
    off = gen.model.disable_adapter() if (gen.has_adapter and not adapter) else contextlib.nullcontext()
    with off, torch.no_grad():
        out = gen.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            streamer=streamer,
            logits_processor=LogitsProcessorList([FiniteLogits(adapter)]),
        )
    return out[0, len(prompt_ids) :].tolist()


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
            raise NonFiniteOutput(
                "the model's outputs are not finite (NaN or inf)",
                "Its weights may be broken, or overflow in their dtype.",
            )
        return scores
