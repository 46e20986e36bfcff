"""4-bit loading reads the checkpoint tensor by tensor (lora_cli/model/loading.py, read_checkpoint_without_mmap)."""

from __future__ import annotations

import torch

from lora_cli.model.loading import load_base_model, read_checkpoint_without_mmap
from lora_cli.recipe.schema import ModelConfig
from tests.helpers import without_cpu_bf16_repacking


def test_4bit_load_reads_with_pread_and_quantizes_the_same_weights(tiny_llama):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(name=str(tiny_llama), dtype="float32", quantization="4bit")
    ours = load_base_model(cfg)
    # transformers' own load of the same checkpoint, through its memory map
    from lora_cli.model.loading import quantization_config

    plain = without_cpu_bf16_repacking(AutoModelForCausalLM.from_pretrained(
        tiny_llama, dtype=torch.float32, quantization_config=quantization_config(cfg)))
    ours_state, plain_state = ours.state_dict(), plain.state_dict()
    assert ours_state.keys() == plain_state.keys()
    for name, tensor in plain_state.items():
        assert torch.equal(ours_state[name], tensor), name
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)

    # the patched reader really is in use (a transformers change could make it a silent no-op)
    with read_checkpoint_without_mmap(True) as reads:
        AutoModelForCausalLM.from_pretrained(
            tiny_llama, dtype=torch.float32, quantization_config=quantization_config(cfg)
        )
    assert reads and all(str(path).endswith(".safetensors") for path in reads)
    import transformers.modeling_utils as modeling_utils
    from safetensors import safe_open

    assert modeling_utils.safe_open is safe_open  # restored afterwards
