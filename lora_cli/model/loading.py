"""Loading a base model and its tokenizer: in full precision, 8-bit or 4-bit (QLoRA), exactly as
a run trained on it, and without holding more memory than the model itself.
"""

from __future__ import annotations

import contextlib
import gc
import os

from lora_cli import ranks
from lora_cli.console import first_line
from lora_cli.errors import ModelError
from lora_cli.model.dtypes import resolve_dtype
from lora_cli.model.sources import ModelSource, resolve_model_source
from lora_cli.recipe.schema import ModelConfig


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
        + f": {first_line(error)}",
        "Offline, name a local model directory or a .gguf file; online, check the id and your access.",
    )


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


def adapter_tokenizer(adapter_dir, cfg: ModelConfig, source: ModelSource):
    """The tokenizer saved with an adapter (what training used), else the base model's."""
    from transformers import AutoTokenizer

    if (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=cfg.trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return load_tokenizer(cfg, source)


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
        kwargs["quantization_config"] = quantization_config(cfg)
        if device_map is None:
            # Under DDP each rank loads its own quantized copy onto its own GPU (LOCAL_RANK);
            # under FSDP / ZeRO-3 the engine places the weights itself (see distributed.py).
            device_map = quantized_device_map(cuda=torch.cuda.is_available())
        if cfg.quantization == "4bit" and ranks.shards_parameters():
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
    import transformers.modeling_utils as modeling_utils

    if not active:
        yield []
        return
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
        bnb_4bit_quant_storage=compute if ranks.shards_parameters() else torch.uint8,
    )


def quantized_device_map(*, cuda: bool):
    """Where a quantized base goes: each DDP rank loads its own copy onto its own GPU.

    Under FSDP / ZeRO-3 the engine places (and shards) the weights itself, so from_pretrained must
    not pin them to a device. On CPU there is nothing to choose.
    """
    import torch

    if not cuda or ranks.shards_parameters():
        return None
    return {"": ranks.local_rank() if ranks.is_distributed() else torch.cuda.current_device()}


def place_for_inference(model, *, quantized: bool) -> None:
    """On a GPU, a full-precision model moves there (quantized bases are placed when loaded)."""
    import torch

    if torch.cuda.is_available() and not quantized:
        model.to("cuda")
