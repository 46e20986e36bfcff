"""lora.init: how a fresh adapter starts, through PEFT's own initializations, and what each one
needs around it so that the saved adapter applies to the original, unmodified base.

  default, gaussian  init_lora_weights=True / "gaussian": B = 0, the model starts as the base.
  pissa, olora       init_lora_weights="pissa" / "olora": A and B from the SVD / QR of each base
                     weight, and the base weight in memory becomes W - scale·B0·A0 (never the
                     files). The saved adapter is converted as PEFT documents it (save_pretrained
                     with path_initial_model_for_weight_conversion, from the initial adapter kept
                     at the start): ΔW = B·A - B0·A0 as a plain LoRA of rank 2r that applies to
                     the original base, so merge, export, eval and serve need nothing special.
                     Checkpoints keep the unconverted adapter: a resume rebuilds the same
                     decomposition (it is deterministic) and continues from them.
  loftq              a 4-bit NF4 base (recipe/load.py checks): A and B start as the rank-r SVD
                     of W - dequantize(Q(W)) for each quantized weight, so the adapter cancels most
                     of the quantization error. This is PEFT's replace_lora_weights_loftq (one LoftQ
                     step: the quantized base stays as it is; the original weights read from the
                     model's safetensors), computed on the weight's own device (PEFT's computes on
                     CUDA only) and divided by the LoRA scaling, which PEFT leaves to lora_alpha = r:
                     the forward pass multiplies B·A by alpha/r, and the residual is what it must add.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

from lora_cli.errors import ModelError
from lora_cli.recipe.schema import LoraSection

PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True}
CONVERTED = ("pissa", "olora")  # they change the base weights in memory: the adapter is converted


def peft_init(lora: LoraSection):
    """LoraConfig.init_lora_weights for lora.init (loftq starts as default, then apply_loftq)."""
    return PEFT_INIT[lora.init]


def initial_adapter(model, lora: LoraSection) -> dict | None:
    """A copy of the adapter as initialized, where saving needs it for the conversion; else None."""
    if lora.init not in CONVERTED:
        return None
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def sharded_conversion_error(init: str) -> ModelError:
    """PiSSA / OLoRA under FSDP or ZeRO-3: the conversion reads whole weights (said before training)."""
    return ModelError(f"lora.init: {init} cannot be converted from sharded weights (FSDP / ZeRO-3)",
                      "Train it with DDP or on one device, or use lora.init: default.")


def save_adapter(model, directory: Path, *, state_dict=None, initial: dict | None = None) -> None:
    """model.save_pretrained; a PiSSA / OLoRA adapter converted to fit the original base."""
    if initial is None:
        model.save_pretrained(directory, state_dict=state_dict)
        return
    if state_dict is not None:  # (sharded engines: peft would look for the initial adapter in it)
        raise sharded_conversion_error(str(model.peft_config["default"].init_lora_weights))
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="lora-initial-") as tmp:
        initial_dir = Path(tmp) / "initial"  # peft loads it as an adapter named after its folder
        initial_dir.mkdir()
        save_file({k: v.contiguous() for k, v in initial.items()}, str(initial_dir / "adapter_model.safetensors"))
        with warnings.catch_warnings():
            # peft warns that PiSSA changes the base weights when it loads the initial adapter
            # beside it: the very conversion it recommends, which this is.
            warnings.filterwarnings("ignore", message=".*changes the base weights")
            model.save_pretrained(directory, path_initial_model_for_weight_conversion=str(initial_dir))


# --------------------------------------------------------------------------- LoftQ


def weights_directory(source) -> Path:
    """The local directory of a model source's weights (a hub model: its cached snapshot)."""
    if source.is_local:
        return Path(source.location)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source.location, revision=source.revision, local_files_only=True))


def apply_loftq(model, weights_dir: Path) -> int:
    """Start every 4-bit LoRA layer at its quantization residual (module doc); returns how many."""
    import bitsandbytes.functional as bnbf
    import torch

    weights = _SafetensorsWeights(weights_dir)
    done = 0
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
        quant_state = getattr(getattr(base, "weight", None), "quant_state", None)
        if lora_a is None or "default" not in lora_a or quant_state is None:
            continue
        with torch.no_grad():
            _start_at_residual(name, module, base, quant_state, weights, weights_dir, bnbf)
        done += 1
    if not done:
        raise ModelError("lora.init: loftq found no 4-bit layer with LoRA", "LoftQ needs model.quantization: 4bit.")
    return done


def _start_at_residual(name, module, base, quant_state, weights, weights_dir, bnbf) -> None:
    import torch

    dequantized = bnbf.dequantize_4bit(base.weight.data, quant_state).float()
    original = weights.get(name.removeprefix("base_model.model.") + ".weight").to(dequantized.device).float()
    # A checkpoint of Conv1D layers (GPT-2) stores them transposed: the orientation that
    # quantizes to this weight is the one far closer to it.
    candidates = [w for w in (original, original.T) if w.shape == dequantized.shape]
    if not candidates:
        raise ModelError(f"lora.init: loftq: {name} is {tuple(original.shape)} in {weights_dir}, "
                         f"{tuple(dequantized.shape)} in the model", "Is model.name the model it was loaded from?")
    original = min(candidates, key=lambda w: float((w - dequantized).norm()))
    u, s, vh = torch.linalg.svd(original - dequantized, full_matrices=False)
    r, scaling = module.r["default"], module.scaling["default"]
    root = torch.sqrt(s[:r] / scaling)  # scaling·B·A = the rank-r part of the residual
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    a.data = (root[:, None] * vh[:r]).to(a.dtype)
    b.data = (u[:, :r] * root).to(b.dtype)


class _SafetensorsWeights:
    """Tensors by name from a model directory's safetensors (one file or an index of shards)."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if (directory / "model.safetensors").is_file():
            self.files = None
            self.single = directory / "model.safetensors"
        elif index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        else:
            raise ModelError(
                f"lora.init: loftq reads the original weights from safetensors files, and {directory} has none",
                "Use a model saved as safetensors (save_pretrained), or lora.init: default.",
            )

    def get(self, name: str):
        from safetensors import safe_open

        path = self.single if self.files is None else self.files.get(name)
        if path is None:  # saved without the base model's prefix (model. / transformer.)
            short = name.split(".", 1)[-1]
            path = self.files.get(short) if self.files else None
            name = short
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            key = name if name in keys else name.split(".", 1)[-1]
            if key not in keys:
                raise ModelError(f"lora.init: loftq: no tensor {name} in {path}",
                                 "Is model.name the model it was loaded from?")
            return f.get_tensor(key)

