"""Tiny real models for tests: a 2-layer GPT-2 and a 2-layer Llama with a tokenizer trained on the fly.

They go through `save_pretrained` into a directory, so tests load them through exactly the code
path users' local model directories take.
"""

from __future__ import annotations

from pathlib import Path

# ChatML, the template SmolLM2 and many instruct models use; the Llama fixture carries it so
# chat data is tested with a real template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "once upon a time there was a tiny model that learned to count",
    "one two three four five six seven eight nine ten",
    "define: word. a definition follows the word and ends with a period",
    "question: what is the capital of france? answer: paris",
    "Below is an instruction that describes a task. Write a response that completes the request.",
    "### Instruction: ### Input: ### Response:",
    "user assistant system tool hello world abc xyz 0123456789",
]


# Larger than the usual 0.02: at width 64, 0.02 keeps every logit within about ±1, so no
# adapter could make a confident prediction and "loss goes down" would be a weak signal.
INIT_RANGE = 0.2


def train_tokenizer(vocab_size: int = 300, chat_template: str | None = None):
    """A byte-level BPE tokenizer trained in a few milliseconds on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_tiny_model(
    directory: str | Path, arch: str = "gpt2", seed: int = 0, chat_template: bool | None = None
) -> Path:
    """Build a random 2-layer `arch` ('gpt2' | 'llama') model + tokenizer and save it to `directory`.

    The Llama tokenizer has a ChatML chat template; the GPT-2 one has none unless
    `chat_template=True` (the tests need a tokenizer without one).
    """
    if chat_template is None:
        chat_template = arch == "llama"
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    torch.manual_seed(seed)
    if arch == "gpt2":
        tokenizer = train_tokenizer(chat_template=CHATML_TEMPLATE if chat_template else None)
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            initializer_range=INIT_RANGE,
        )
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        tokenizer = train_tokenizer(chat_template=CHATML_TEMPLATE if chat_template else None)
        # Like SmolLM2: the end-of-turn token is the EOS, so a chat model learns to stop.
        tokenizer.eos_token = "<|im_end|>"
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
            initializer_range=INIT_RANGE,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(arch)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
