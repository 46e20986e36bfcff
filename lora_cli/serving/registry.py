"""What a server (or a chat) has loaded: one base model and every run given as a named adapter on it.

The base is loaded once, the first run's adapter through the same checked path `lora generate`
uses, every further run's adapter beside it (peft `load_adapter(..., adapter_name=...)`), so one
forward pass can route each row of a batch through its own adapter. The base itself is served too,
under the name the runs' recipe gives it. Runs trained on different bases cannot share one model:
that is refused before anything is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_cli.console import first_line, info
from lora_cli.errors import LoraError, ModelError, is_out_of_memory
from lora_cli.inference.generation import eos_token_ids, load_generator
from lora_cli.model.adapters import ADAPTER_WEIGHTS
from lora_cli.model.facts import model_context
from lora_cli.model.loading import adapter_tokenizer, load_tokenizer
from lora_cli.model.sources import BUILTIN_MODELS, resolve_model_source
from lora_cli.recipe.load import load_recipe
from lora_cli.run.lookup import resolve_run
from lora_cli.run.paths import RunPaths
from lora_cli.run.recipes import load_run_recipe, trained_on_chat

# The name peft gives the rows of a mixed batch that use no adapter.
BASE_ROUTE = "__base__"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")
# What makes two runs' bases the same loaded model (the name is the absolute path run.json recorded).
BASE_FIELDS = ("name", "revision", "dtype", "quantization", "quant_type", "double_quant", "compute_dtype")


@dataclass
class Served:
    """One name a client can ask for: an adapter on the shared base, or the base itself."""

    name: str
    route: str  # the peft adapter name its rows use, BASE_ROUTE for the base
    tokenizer: object
    chat_trained: bool  # generate's default: the chat template when the run trained on chat data
    system_prompt: str | None  # the run's data.system_prompt, as generate adds it
    eos_ids: list[int] = field(default_factory=list)
    run: Path | None = None


@dataclass
class Registry:
    model: object  # a PeftModel when adapters are loaded, else the plain model
    served: dict[str, Served]  # by name; adapters first, the base last
    context: int | None  # the model's context length
    has_adapters: bool

    @property
    def names(self) -> list[str]:
        return list(self.served)

    @property
    def base(self) -> Served:
        return next(s for s in self.served.values() if s.route == BASE_ROUTE)


@dataclass(frozen=True)
class Spec:
    name: str | None  # NAME=RUN's NAME
    target: str


def parse_spec(text: str) -> Spec:
    """RUN or NAME=RUN (a path that exists with a `=` in it is a path)."""
    if "=" not in text or Path(text).expanduser().exists():
        return Spec(None, text)
    name, target = text.split("=", 1)
    if not NAME_PATTERN.fullmatch(name) or not target:
        raise LoraError(
            f"{text!r} is not RUN or NAME=RUN",
            "NAME starts with a letter or digit and holds letters, digits and . _ : / -, "
            "e.g. pirate=runs/pirate-v2.",
        )
    return Spec(name, target)


def load_registry(specs: list[str], model: str | None) -> Registry:
    """Runs (default: the latest) as adapters on their shared base, or a plain model (--model, or
    a single RUN that is a model directory such as RUN/merged)."""
    parsed = [parse_spec(s) for s in specs]
    runs = [s for s in parsed if _is_run(s.target)]
    plain = [s for s in parsed if not _is_run(s.target)]
    if plain and (runs or len(plain) > 1 or model is not None):
        named = ", ".join(s.target for s in plain)
        raise LoraError(
            f"{named}: not a run directory (no recipe.yaml)",
            "Serve runs (adapters on one base), or a single model (a merged model, --model M) on its own.",
        )
    if plain:
        return _plain(plain[0].target, plain[0].name)
    if not runs and model is not None:
        return _plain(model, None)
    return _runs(runs or [Spec(None, None)], model)


def _is_run(target: str | None) -> bool:
    """A run directory, or a path that does not exist (the run lookup then says so); a model is an
    existing directory or file without a recipe.yaml, or a built-in model name (hub ids: --model)."""
    if target is None:
        return True
    path = Path(target).expanduser()
    if (path / "recipe.yaml").is_file():
        return True
    return not path.exists() and target.lower() not in BUILTIN_MODELS


def _plain(name: str, served_as: str | None) -> Registry:
    gen = load_generator(None, name)
    served = Served(served_as or name, BASE_ROUTE, gen.tokenizer, False, None, eos_token_ids(gen.model, gen.tokenizer))
    return Registry(gen.model, {served.name: served}, model_context(gen.model.config), False)


def _runs(specs: list[Spec], model: str | None) -> Registry:
    resolved = []  # (served name, paths, recipe)
    for spec in specs:
        paths = resolve_run(spec.target)
        resolved.append((spec.name or paths.root.name, paths, load_run_recipe(paths)))
    _check_one_base(resolved, model)
    _check_names([name for name, _, _ in resolved])

    first_name, first_paths, first_recipe = resolved[0]
    gen = load_generator(first_paths.root, None)  # base + the first adapter, checked as generate checks it
    peft_model = gen.model
    served = {first_name: _served(first_name, "default", gen.tokenizer, first_paths, first_recipe, peft_model)}
    source = resolve_model_source(first_recipe.model)
    for index, (name, paths, recipe) in enumerate(resolved[1:], start=1):
        route = f"adapter_{index}"  # peft names become module keys: served names may hold dots
        _load_more(peft_model, paths, route)
        tokenizer = adapter_tokenizer(paths.adapter, recipe.model, source)
        served[name] = _served(name, route, tokenizer, paths, recipe, peft_model)
        info(f"adapter {name}: {paths.root}")
    peft_model.eval()
    base_name = load_recipe(first_paths.recipe).model.name  # as the recipe names it, not the recorded path
    if base_name in served:
        raise LoraError(f"a run is named {base_name!r}, the base model's name",
                        f"Rename it: NEWNAME={served[base_name].run}.")
    base_tokenizer = load_tokenizer(first_recipe.model, source)
    served[base_name] = Served(base_name, BASE_ROUTE, base_tokenizer, False, None,
                               eos_token_ids(peft_model, base_tokenizer))
    return Registry(peft_model, served, model_context(peft_model.config), True)


def _served(name: str, route: str, tokenizer, paths: RunPaths, recipe, model) -> Served:
    return Served(name, route, tokenizer, trained_on_chat(paths, recipe), recipe.data.system_prompt,
                  eos_token_ids(model, tokenizer), paths.root)


def _check_one_base(resolved: list, model: str | None) -> None:
    first_name, _, first = resolved[0]
    for name, _, recipe in resolved[1:]:
        differ = [f for f in BASE_FIELDS if getattr(recipe.model, f) != getattr(first.model, f)]
        if differ:
            what = ", ".join(f"model.{f} {getattr(first.model, f)} vs {getattr(recipe.model, f)}" for f in differ)
            raise LoraError(
                f"runs {first_name} and {name} were trained on different bases ({what})",
                "One server holds one base: serve the runs of each base with its own `lora serve` (another --port).",
            )
    if model is not None and not _same_model(model, first.model.name):
        raise LoraError(
            f"--model {model} is not the base run {first_name} was trained on ({first.model.name})",
            "Drop --model (runs load their own base), or serve runs trained on that model.",
        )


def _same_model(given: str, recorded: str) -> bool:
    a, b = Path(given).expanduser(), Path(recorded).expanduser()
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return given == recorded


def _check_names(names: list[str]) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise LoraError(f"two runs are served as {name!r}",
                            "Name them apart with NAME=RUN, e.g. a=runs/x b=runs/y.")
        seen.add(name)


def _load_more(peft_model, paths: RunPaths, route: str) -> None:
    """Another run's adapter beside the first; a damaged one is named, not a peft traceback."""
    adapter = paths.adapter
    if not any((adapter / w).is_file() for w in ADAPTER_WEIGHTS):
        raise ModelError(f"{adapter}: the adapter has no weights ({ADAPTER_WEIGHTS[0]} is missing)",
                         "Train the run again, or restore its adapter/ directory.")
    try:
        peft_model.load_adapter(str(adapter), adapter_name=route, is_trainable=False)
    except Exception as e:
        if is_out_of_memory(e):
            raise
        raise ModelError(f"{adapter}: cannot load the adapter ({type(e).__name__}: {first_line(e, 200)})",
                         "Check that the run trained on the same base, or train it again.") from None
