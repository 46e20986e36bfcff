"""Rows -> tokens + labels: the prompt masked with IGNORE_INDEX, the answer (and the EOS that
teaches the model to stop) supervised, data.max_length applied.

Every row is checked before any is tokenized; bad rows, too-long rows (too_long: error) and a
data set with no example left are DataErrors naming the rows. Tokenizers are duck-typed.
"""

from __future__ import annotations

import bisect

from lora_cli.console import plural
from lora_cli.data.formats import (
    FORMAT_HELP,
    RowProblem,
    chat_messages,
    chat_text_and_spans,
    detect_format,
    prompt_and_answer,
)
from lora_cli.data.records import Problems
from lora_cli.data.report import TokenizeCounts
from lora_cli.errors import DataError

IGNORE_INDEX = -100  # the label value the loss skips (PyTorch's cross-entropy default)

_TOKENIZE_CHUNK = 1024  # rows per batched tokenizer call


def tokenize_records(
    records: list[dict],
    cfg,
    tokenizer,
    *,
    source: str,
    where: list[str] | None = None,
) -> tuple[list[dict], TokenizeCounts]:
    """Rows -> [{"input_ids", "labels"}] (unpacked), applying cfg.format / max_length / too_long.

    `source` names the rows in messages; `where` (one entry per row) is finer, e.g. "a.jsonl row 3
    (line 4)". Every row is checked before any is tokenized. Raises DataError on bad rows, on
    too_long: error, and when no example is left.
    """
    if not records:
        raise DataError(f"{source}: no rows", "add rows to the data")
    where = where or [f"{source} row {i}" for i in range(1, len(records) + 1)]
    fmt = cfg.format if cfg.format != "auto" else detect_format(records[0], where[0])
    if fmt == "preference":  # pairs are data/preference.py's, for train.method dpo/orpo
        raise DataError(
            f"{where[0]}: this is preference data ({{prompt, chosen, rejected}} rows), and supervised "
            "training (train.method: sft) learns from answers, not from pairs",
            "set train.method: dpo or orpo to train on the pairs, or convert the rows to "
            "{prompt, completion} (the chosen answer as the completion)",
        )
    eos = eos_id(tokenizer)
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source}: chat data (rows with \"messages\") needs a tokenizer with a chat template, "
            "and this model's tokenizer has none",
            "use a model whose tokenizer has a chat template (an instruct/chat model), or convert "
            "the rows to format: completion ({prompt, completion})",
        )

    problems = Problems()
    parts = []
    for record, w in zip(records, where):
        try:
            if fmt == "chat":
                messages = chat_messages(record, cfg.system_prompt)
                text, spans = chat_text_and_spans(tokenizer, messages, cfg.train_on_prompt)
                parts.append((text, spans, messages[-1]["role"] == "assistant"))
            else:
                parts.append(prompt_and_answer(fmt, record))
        except RowProblem as e:
            problems.add(w, str(e))
    problems.raise_if_any(f"bad rows ({fmt} format)", f"{FORMAT_HELP[fmt]}; fix or remove the rows listed")

    if fmt == "chat":
        pairs = _tokenize_chat(tokenizer, parts, eos)
    else:
        pairs = _tokenize_prompt_answer(tokenizer, parts, eos, train_on_prompt=cfg.train_on_prompt)

    counts = TokenizeCounts(format=fmt, rows=len(records), examples=0)
    examples = []
    too_long = Problems()
    for (ids, labels), w in zip(pairs, where):
        counts.longest = max(counts.longest, len(ids))
        counts.raw_lengths.append(len(ids))
        if len(ids) > cfg.max_length:
            if cfg.too_long == "error":
                too_long.add(w, f"{len(ids)} tokens, longer than max_length {cfg.max_length}")
                continue
            if cfg.too_long == "drop":
                counts.dropped += 1
                counts.dropped_where.append(w)
                continue
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            counts.truncated += 1
            counts.truncated_where.append(w)
        supervised = supervised_count(labels)
        if supervised == 0:
            counts.dropped_no_supervised += 1
            counts.no_supervised_where.append(w)
            continue
        counts.tokens += len(ids)
        counts.supervised_tokens += supervised
        counts.lengths.append(len(ids))
        counts.eos_last += eos in labels[1:]  # labels[0] is never used
        examples.append({"input_ids": ids, "labels": labels})
    too_long.raise_if_any(
        f"rows longer than max_length {cfg.max_length} tokens",
        "raise data.max_length, or set data.too_long: truncate (keep the first max_length tokens) "
        "or drop (skip those rows)",
    )
    counts.examples = len(examples)
    if not examples:
        raise DataError(
            f"{source}: no examples left out of {plural(len(records), 'row')} ({counts.dropped} longer than "
            f"max_length {cfg.max_length} dropped, {counts.dropped_no_supervised} with no supervised tokens)",
            "check the data (empty answers? prompts longer than max_length?), raise data.max_length, "
            "or use data.too_long: truncate",
        )
    return examples, counts


def supervised_count(labels: list[int]) -> int:
    # A causal LM predicts token t from tokens < t: the first label is never used.
    return max(0, len(labels) - 1 - labels.count(IGNORE_INDEX) + (labels[:1] == [IGNORE_INDEX]))


def eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the model's tokenizer has no EOS token, so examples cannot be terminated",
                        "use a model whose tokenizer defines eos_token")
    return int(eos)


def _encode(tokenizer, texts: list[str], special: bool, offsets: bool = False) -> list:
    out_ids, out_offsets = [], []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        enc = tokenizer(texts[start : start + _TOKENIZE_CHUNK], add_special_tokens=special,
                        return_offsets_mapping=offsets)
        out_ids += enc["input_ids"]
        if offsets:
            out_offsets += enc["offset_mapping"]
    return (out_ids, out_offsets) if offsets else out_ids


def _tokenize_prompt_answer(tokenizer, parts, eos: int, train_on_prompt: bool):
    """text: tokens(text) + EOS, all supervised. completion/alpaca: tokens(prompt) (with BOS if the
    tokenizer adds one) + tokens(answer) + EOS, the prompt masked unless train_on_prompt."""
    is_text = parts[0][0] is None
    firsts = _encode(tokenizer, [a if is_text else p for p, a in parts], special=True)
    answers = [[] for _ in parts] if is_text else _encode(tokenizer, [a for _, a in parts], special=False)
    cut = special_suffix(tokenizer)
    pairs = []
    for p, a in zip(firsts, answers):
        p = p[: len(p) - cut]
        ids = p + a + [eos]
        supervise_prompt = is_text or train_on_prompt
        labels = list(ids) if supervise_prompt else [IGNORE_INDEX] * len(p) + a + [eos]
        pairs.append((ids, labels))
    return pairs


def special_suffix(tokenizer) -> int:
    """How many tokens the tokenizer appends after the text (an EOS or SEP, with some tokenizers).

    They would land between prompt and answer, or before our own EOS: we cut them off."""
    plain = _encode(tokenizer, ["a"], special=False)[0]
    full = _encode(tokenizer, ["a"], special=True)[0]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return len(full) - start - len(plain)
    return 0


def _tokenize_chat(tokenizer, parts, eos: int):
    texts = [text for text, _, _ in parts]
    eos_text = getattr(tokenizer, "eos_token", None) or tokenizer.convert_ids_to_tokens(eos)
    try:
        all_ids, all_offsets = _encode(tokenizer, texts, special=False, offsets=True)
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer: no offsets
        all_ids, all_offsets = None, None
    pairs = []
    for n, (text, spans, ends_with_assistant) in enumerate(parts):
        if all_ids is not None:
            ids, labels = all_ids[n], _labels_from_offsets(all_ids[n], all_offsets[n], spans)
        else:
            ids, labels = _tokenize_segments(tokenizer, text, spans)
        if ends_with_assistant and not text.rstrip().endswith(eos_text):
            ids, labels = ids + [eos], labels + [eos]
        pairs.append((ids, labels))
    return pairs


def _labels_from_offsets(ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    """A token is supervised when its characters overlap an assistant span.

    Token offsets are sorted (one text, no added special tokens), so each span's tokens are one
    slice, found by bisection: tokens ending after the span's start and starting before its end.
    """
    labels = [IGNORE_INDEX] * len(ids)
    if not spans:
        return labels
    starts = [s for s, _ in offsets]
    ends = [e for _, e in offsets]
    for a, b in spans:
        i, j = bisect.bisect_right(ends, a), bisect.bisect_left(starts, b)
        labels[i:j] = ids[i:j]
    return labels


def _tokenize_segments(tokenizer, text: str, spans: list[tuple[int, int]]):
    """Fallback without offsets: tokenize the masked and supervised stretches separately."""
    ids, labels, pos = [], [], 0
    for a, b in [*spans, (len(text), len(text))]:
        for piece, supervised in ((text[pos:a], False), (text[a:b], True)):
            if piece:
                piece_ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
                ids += piece_ids
                labels += piece_ids if supervised else [IGNORE_INDEX] * len(piece_ids)
        pos = b
    return ids, labels

