"""train.optimizer: the HF Trainer's optimizers under the recipe's names.

  - checked before any model is loaded: an optimizer this machine cannot run (bitsandbytes
    missing or without a kernel for the device, no fused AdamW for it) is exit 2 with the fix,
    found by one optimizer step on a 4096-element tensor on the device training will use;
  - the TrainingArguments that select it (optim, betas, epsilon);
  - the bytes of its state per trainable tensor, for the memory estimate (training/memory.py),
    as measured on the optimizers themselves (tests/test_optimizers.py compares them);
  - LoRA+ (lora.lr_ratio): PEFT's create_loraplus_optimizer around the same optimizer class.

torch and bitsandbytes are imported inside the functions that need them: `lora validate` checks
the recipe before paying for them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from lora_cli import ranks
from lora_cli.console import first_line
from lora_cli.errors import RecipeError
from lora_cli.recipe.schema import Recipe

# bitsandbytes keeps the states of smaller tensors in 32 bits (its optimizers' min_8bit_size), and
# quantizes the others blockwise: one float32 absmax per block of 256, one 256-entry float32 map.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
BNB_QMAP_BYTES = 256 * 4


@dataclass(frozen=True)
class Optimizer:
    trainer_name: str  # TrainingArguments.optim
    states: int  # full-size state tensors per parameter tensor (Adafactor: factored, see state_bytes)
    eight_bit: bool = False  # bitsandbytes
    paged: bool = False
    betas: bool = True  # reads adam_beta1 / adam_beta2
    epsilon: bool = True  # reads adam_epsilon
    summary: str = ""


OPTIMIZERS = {
    "adamw_torch": Optimizer("adamw_torch", 2, summary="AdamW: 2 states per parameter, in its dtype"),
    "adamw_torch_fused": Optimizer("adamw_torch_fused", 2, summary="AdamW (fused): 2 states per parameter"),
    "adafactor": Optimizer("adafactor", 0, betas=False, epsilon=False,
                           summary="Adafactor: a row and a column of second moments per matrix"),
    "sgd": Optimizer("sgd", 0, betas=False, epsilon=False, summary="SGD: no state"),
    "adamw_8bit": Optimizer("adamw_8bit", 2, eight_bit=True,
                            summary=f"AdamW 8-bit: 2 states in 8 bits (tensors < {BNB_MIN_8BIT_SIZE} elements: 32)"),
    "lion_8bit": Optimizer("lion_8bit", 1, eight_bit=True, epsilon=False,
                           summary=f"Lion 8-bit: 1 state in 8 bits (tensors < {BNB_MIN_8BIT_SIZE} elements: 32)"),
    "paged_adamw_8bit": Optimizer("paged_adamw_8bit", 2, eight_bit=True, paged=True,
                                  summary="paged AdamW 8-bit: as adamw_8bit, paged to CPU memory on CUDA"),
}


def optimizer_arguments(recipe: Recipe) -> dict:
    """TrainingArguments that select train.optimizer and its hyperparameters."""
    t = recipe.train
    return {
        "optim": OPTIMIZERS[t.optimizer].trainer_name,
        "adam_beta1": t.adam_beta1,
        "adam_beta2": t.adam_beta2,
        "adam_epsilon": t.adam_epsilon,
    }


# --------------------------------------------------------------------------- before the model


def training_device() -> str:
    """The device the Trainer will train on (its own order: CUDA, then MPS, then the CPU)."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{ranks.local_rank()}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_optimizer(recipe: Recipe) -> None:
    """Exit 2 now, before any model is loaded, when train.optimizer cannot run on this machine."""
    name = recipe.train.optimizer
    kind = OPTIMIZERS[name]
    if not kind.eight_bit and name != "adamw_torch_fused":
        return  # torch's own AdamW, Adafactor and SGD run wherever torch does
    device = training_device()
    problem = _probe(kind, device)
    if problem:
        raise RecipeError("train.optimizer", [f"{name} cannot run on this machine ({device}): {problem}"],
                          _fix(kind, problem))


def _probe(kind: Optimizer, device: str) -> str | None:
    """One step of the optimizer on a tensor big enough for 8-bit states; None if it ran."""
    try:
        import torch

        param = torch.nn.Parameter(torch.zeros(BNB_MIN_8BIT_SIZE, device=device))
        if kind.eight_bit:
            try:
                import bitsandbytes.optim as bnb_optim
            except ImportError as e:
                return f"bitsandbytes cannot be imported ({first_line(e, 160)})"
            cls = bnb_optim.Lion if kind.trainer_name.startswith("lion") else bnb_optim.AdamW
            extra = {"optim_bits": 8, "is_paged": kind.paged}
        else:
            cls, extra = torch.optim.AdamW, {"fused": True}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (bitsandbytes: paged falls back on the CPU; notes say so)
            optimizer = cls([param], lr=1e-3, **extra)
            param.grad = torch.ones_like(param)
            optimizer.step()
        return None
    except Exception as e:  # whatever the library says is the reason: shown, with our fix
        return f"{type(e).__name__}: {first_line(e, 200)}"


def _fix(kind: Optimizer, problem: str) -> str:
    if kind.eight_bit and "cannot be imported" in problem:
        return "pip install bitsandbytes, or use train.optimizer: adamw_torch."
    if kind.eight_bit:
        return ("bitsandbytes has no 8-bit optimizer kernel for this device: use train.optimizer: adamw_torch "
                "(or adafactor, whose states are also small), or update bitsandbytes.")
    return "Use train.optimizer: adamw_torch (the same AdamW, one kernel per tensor)."


def optimizer_notes(recipe: Recipe) -> list[str]:
    """What this run's optimizer settings do differently from what they say (lora validate, lora train)."""
    t, defaults = recipe.train, type(recipe.train)()
    kind = OPTIMIZERS[t.optimizer]
    notes = []
    unused = [key for key, used in (("adam_beta1", kind.betas), ("adam_beta2", kind.betas),
                                    ("adam_epsilon", kind.epsilon)) if not used]
    changed = [key for key in unused if getattr(t, key) != getattr(defaults, key)]
    if changed:
        notes.append(f"{', '.join('train.' + k for k in changed)} {'is' if len(changed) == 1 else 'are'} not used by "
                     f"train.optimizer: {t.optimizer}")
    if kind.paged and not training_device().startswith("cuda"):
        notes.append(f"train.optimizer: {t.optimizer}: bitsandbytes pages optimizer states on CUDA only; "
                     f"on {training_device()} it runs as adamw_8bit")
    return notes


# --------------------------------------------------------------------------- memory


def state_bytes(name: str, shapes: list[tuple[int, ...]], nbytes: int) -> int:
    """Bytes of optimizer state for trainable tensors of these shapes, stored in `nbytes` per element.

    As the optimizers keep it (measured): torch AdamW 2 tensors in the parameter's dtype plus a
    4-byte step; Adafactor (as the Trainer builds it: no first moment) a row and a column for a
    matrix, a full tensor for a vector, plus a 4-byte RMS; SGD (no momentum) nothing; bitsandbytes
    8-bit: per state 1 byte per element, a float32 absmax per block of 256 and a 256-entry float32
    map, and 32-bit states for tensors under 4096 elements.
    """
    kind = OPTIMIZERS[name]
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if name == "adafactor":
            factored = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else n
            total += factored * nbytes + 4
        elif kind.eight_bit:
            if n >= BNB_MIN_8BIT_SIZE:
                total += kind.states * (n + 4 * math.ceil(n / BNB_BLOCK) + BNB_QMAP_BYTES)
            else:
                total += kind.states * n * 4
        elif kind.states:
            total += kind.states * n * nbytes + 4
    return total


# --------------------------------------------------------------------------- LoRA+


def loraplus_optimizer(model, args, lr_ratio: float):
    """LoRA+ (lora.lr_ratio): PEFT's create_loraplus_optimizer around the optimizer class and
    arguments train.optimizer gives the Trainer; B matrices at lr x lr_ratio, weight decay as
    train.weight_decay."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr", args.learning_rate)
    kwargs.pop("weight_decay", None)  # (SGD's copy of it: LoRA+ sets it per group)
    return create_loraplus_optimizer(
        model, optimizer_cls, lr=lr, loraplus_lr_ratio=lr_ratio, loraplus_weight_decay=args.weight_decay, **kwargs
    )
