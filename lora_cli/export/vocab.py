"""The tokenizer as llama.cpp reads it: `tokenizer.ggml.*` (BPE vocabulary, merges, token types,
special ids, the pre-tokenizer) and `tokenizer.chat_template`.

llama.cpp does not run the tokenizer.json pre-tokenizer; it has its own implementation of each
known one, chosen by `tokenizer.ggml.pre`. We name it from the pre-tokenizer's structure and
refuse one we do not recognise: a wrong choice would split text differently from training, silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lora_cli.errors import ExportError
from lora_cli.export.chat_formats import DetectedChat

# Regexes of the Split pre-tokenizers llama.cpp implements, by its name for them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class VocabFacts:
    pre: str  # tokenizer.ggml.pre
    tokens: int
    add_bos: bool
    end_of_turn_id: int | None


def write_vocab(writer, tokenizer, model_dir: Path, vocab_size: int, chat: DetectedChat | None) -> VocabFacts:
    """Write the tokenizer of the model saved in `model_dir` (its tokenizer.json) into `writer`."""
    import gguf

    spec = _tokenizer_json(model_dir)
    pre = pre_tokenizer_name(spec)
    tokens, types = token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise ExportError(f"the tokenizer in {model_dir} has no BPE merges", "Only BPE tokenizers can be exported.")
    # What the tokenizer does, not what its config files say: llama.cpp adds BOS by this flag.
    add_bos = _adds_bos(tokenizer)
    special.add_special_token["bos"] = add_bos
    special.add_special_token["eos"] = False
    end_of_turn = None
    if chat is not None:
        end_of_turn = tokenizer.convert_tokens_to_ids(chat.format.end_of_turn)
        if end_of_turn == tokenizer.eos_token_id:
            end_of_turn = None  # the EOS already ends a turn
    special.add_to_gguf(writer, quiet=True)
    if end_of_turn is not None:
        writer.add_eot_token_id(end_of_turn)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return VocabFacts(pre, len(tokens), add_bos, end_of_turn)


def check_tokenizer(model_dir: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of the tokenizer saved in `model_dir`; exit 2 (before
    any work) for a tokenizer GGUF export cannot write."""
    return pre_tokenizer_name(_tokenizer_json(model_dir))


def _tokenizer_json(model_dir: Path) -> dict:
    path = model_dir / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ExportError(f"{path} is missing or unreadable: GGUF export needs the fast tokenizer's tokenizer.json",
                          "Export a model whose tokenizer was saved by transformers (a fast tokenizer).") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}"
        raise ExportError(
            f"the tokenizer in {model_dir} is {kind}, not byte-level BPE",
            "GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM, Qwen2); "
            "SentencePiece-style ones (Llama 2, Mistral v0.1-0.3) are not supported yet.",
        )
    return spec


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the tokenizer.json pre-tokenizer, recognised by structure."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == QWEN2_SPLIT:
            return "qwen2"
    raise ExportError(
        f"llama.cpp has no pre-tokenizer matching this tokenizer's ({json.dumps(pre)[:200]})",
        "GGUF export knows the pre-tokenizers of GPT-2, SmolLM, Llama 3 and Qwen2; a guess would tokenize "
        "differently from training.",
    )


def token_list(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token text and type, up to the model's vocab_size (ids the tokenizer lacks, in a
    padded embedding matrix, get placeholder names llama.cpp never produces)."""
    import gguf

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)} but the model's vocab_size is {vocab_size}",
                          "The tokenizer does not belong to this model.")
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:  # stored as plain text, matched before BPE
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos
