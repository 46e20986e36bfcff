"""Preference pairs for train.method dpo / orpo: rows of {prompt, chosen, rejected} -> token ids,
checked row by row, split, and reported on (data/preference_report.py).

    plain  {"prompt": str, "chosen": str, "rejected": str}
    chat   {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
           (the prompt's turns; then the answer's turns, usually one assistant message each)

Each pair becomes {"prompt_ids", "chosen_ids", "rejected_ids"}, the columns TRL's preference
trainers read. The prompt is tokenized exactly as supervised training tokenizes a completion
row's prompt (data/tokenize.py) and as `lora generate` encodes a prompt: plain text with the
tokenizer's BOS, or the chat template with its generation prompt. Each answer ends with EOS
(plain) or the template's end of turn, so the pair also teaches when to stop.

A pair whose chosen and rejected answers are the same tokens teaches nothing and is an error, as
are missing or empty fields and wrong types; rows longer than data.max_length follow
data.too_long (truncate cuts both answers to what fits after the prompt).
"""

from __future__ import annotations

import hashlib
import random
from array import array
from dataclasses import dataclass
from pathlib import Path

from lora_cli.console import plural, type_name
from lora_cli.data.formats import FORMAT_HELP, RowProblem, chat_messages, detect_format, render_chat
from lora_cli.data.preference_report import PairCounts, PreferenceReport, add_pair_details
from lora_cli.data.records import Problems, load_with_locations
from lora_cli.data.tokenize import IGNORE_INDEX, eos_id, special_suffix
from lora_cli.errors import DataError

FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class PreparedPreferences:
    train: list[dict]  # {"prompt_ids", "chosen_ids", "rejected_ids"}
    validation: list[dict] | None
    report: PreferenceReport
    validation_where: list[str] | None = None


def prepare_preferences(cfg, tokenizer, *, seed: int, method: str = "dpo",
                        validation_override: str | list[str] | None = None) -> PreparedPreferences:
    """Load, check, split and tokenize preference rows; the same split rule as data/prepare.py
    (cfg.validation, or a seeded cfg.val_split of the rows), so eval rebuilds it exactly."""
    eos_id(tokenizer)  # a tokenizer without EOS: said before any file is read
    records, where = load_with_locations(cfg.train)
    sources = [str(s) for s in ([cfg.train] if isinstance(cfg.train, (str, Path)) else cfg.train)]
    detected = cfg.format == "auto"
    fmt = detect_format(records[0], where[0]) if detected else cfg.format
    if fmt != "preference":
        raise DataError(
            f"{where[0]}: train.method: {method} trains on preference pairs, and this row is {fmt} data "
            f"(columns: {', '.join(map(str, records[0]))})",
            f"give rows with \"prompt\", \"chosen\" and \"rejected\" ({FORMAT_HELP['preference']}), "
            "or set train.method: sft to train on these rows",
        )
    n_records = len(records)
    val_spec = validation_override if validation_override is not None else cfg.validation
    val_records = val_where = val_from = None
    if val_spec:
        val_records, val_where = load_with_locations(val_spec)
        val_from = ", ".join(map(str, [val_spec] if isinstance(val_spec, (str, Path)) else val_spec))
    elif cfg.val_split > 0:
        k = max(1, round(n_records * cfg.val_split))
        if k >= n_records:
            raise DataError(
                f"data.val_split {cfg.val_split} would hold out {k} of {n_records} rows, leaving none to train on",
                "lower data.val_split, add rows, or pass a validation file (data.validation)",
            )
        held = set(random.Random(seed).sample(range(n_records), k))  # as data/prepare.py draws it
        val_records = [r for i, r in enumerate(records) if i in held]
        val_where = [w for i, w in enumerate(where) if i in held]
        records = [r for i, r in enumerate(records) if i not in held]
        where = [w for i, w in enumerate(where) if i not in held]
        val_from = f"the training rows (val_split {cfg.val_split}, seed {seed})"

    train, counts = tokenize_pairs(records, cfg, tokenizer, source=", ".join(sources), where=where)
    validation = vcounts = None
    if val_records is not None:
        validation, vcounts = tokenize_pairs(val_records, cfg, tokenizer, source=f"validation ({val_from})",
                                             where=val_where)
    report = PreferenceReport(
        format=counts.format, format_detected=detected, method=method, sources=sources, rows=n_records,
        train_records=len(records), train_rows=len(train), validation_rows=len(validation or []),
        validation_from=val_from, max_length=cfg.max_length, too_long=cfg.too_long,
        truncated=counts.truncated, dropped=counts.dropped, train_tokens=counts.tokens,
        supervised_tokens=counts.answer_tokens, longest=counts.longest,
        validation_truncated=vcounts.truncated if vcounts else 0,
        validation_dropped=vcounts.dropped if vcounts else 0,
        fingerprint=fingerprint(train, validation or []),
    )
    if cfg.train_on_prompt:
        report.notes.append(f"data.train_on_prompt is not used by train.method: {method}: pairs are scored on "
                            "their answers only")
    if cfg.system_prompt and counts.format != "preference-chat":
        report.notes.append("data.system_prompt is not used: it applies to chat pairs, and these pairs are plain text")
    add_pair_details(report, counts)
    return PreparedPreferences(train=train, validation=validation, report=report, validation_where=val_where)


def tokenize_pairs(records: list[dict], cfg, tokenizer, *, source: str,
                   where: list[str] | None = None) -> tuple[list[dict], PairCounts]:
    """Rows -> [{"prompt_ids", "chosen_ids", "rejected_ids"}]; every row is checked first and the
    bad ones raised together (a DataError naming the rows)."""
    if not records:
        raise DataError(f"{source}: no rows", "add rows to the data")
    where = where or [f"{source} row {i}" for i in range(1, len(records) + 1)]
    chat = _is_chat(records[0])
    eos = eos_id(tokenizer)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source}: chat pairs (lists of messages) need a tokenizer with a chat template, and this "
            "model's tokenizer has none",
            "use a chat/instruct model, or give the pairs as plain strings",
        )
    problems = Problems()
    texts = []
    for record, w in zip(records, where):
        try:
            texts.append(_chat_texts(record, tokenizer, cfg.system_prompt) if chat else _plain_texts(record))
        except RowProblem as e:
            problems.add(w, str(e))
    problems.raise_if_any("bad preference rows", f"{FORMAT_HELP['preference']}; fix or remove the rows listed")

    pairs = _encode_pairs(tokenizer, texts, eos, chat=chat)
    counts = PairCounts(format="preference-chat" if chat else "preference", rows=len(records))
    same, too_long, kept = Problems(), Problems(), []
    for (prompt, chosen, rejected), w in zip(pairs, where):
        if chosen == rejected:
            same.add(w, "chosen and rejected are the same answer, so the pair prefers nothing")
            continue
        counts.prompt_lengths.append(len(prompt))
        counts.chosen_lengths.append(len(chosen))
        counts.rejected_lengths.append(len(rejected))
        longest = len(prompt) + max(len(chosen), len(rejected))
        counts.longest = max(counts.longest, longest)
        if longest > cfg.max_length:
            if cfg.too_long == "error":
                too_long.add(w, f"{longest} tokens (prompt {len(prompt)} + the longer answer), longer than "
                                f"max_length {cfg.max_length}")
                continue
            room = cfg.max_length - len(prompt)
            if cfg.too_long == "drop" or room < 1:  # the prompt alone fills max_length: nothing to score
                counts.dropped += 1
                counts.dropped_where.append(w + (" (the prompt alone fills max_length)" if room < 1 else ""))
                continue
            chosen, rejected = chosen[:room], rejected[:room]
            if chosen == rejected:  # they differed only past max_length
                counts.dropped += 1
                counts.dropped_where.append(w + " (the answers differ only past max_length)")
                continue
            counts.truncated += 1
            counts.truncated_where.append(w)
        counts.tokens += 2 * len(prompt) + len(chosen) + len(rejected)
        counts.answer_tokens += len(chosen) + len(rejected)
        kept.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    same.raise_if_any("pairs whose chosen and rejected answers are the same",
                      "a preference pair needs two different answers: fix or remove the rows listed")
    too_long.raise_if_any(
        f"pairs longer than max_length {cfg.max_length} tokens",
        "raise data.max_length, or set data.too_long: truncate (cut both answers to fit) or drop",
    )
    if not kept:
        raise DataError(
            f"{source}: no pairs left out of {plural(len(records), 'row')} ({counts.dropped} dropped: longer "
            f"than max_length {cfg.max_length})",
            "raise data.max_length, or use data.too_long: truncate",
        )
    return kept, counts


def _is_chat(record: dict) -> bool:
    return isinstance(record.get("prompt"), list) or isinstance(record.get("chosen"), list)


def _plain_texts(record: dict) -> tuple[str, str, str]:
    out = []
    for key in FIELDS:
        if key not in record or record[key] is None:
            raise RowProblem(f"missing field '{key}' (the row has: {', '.join(map(str, record)) or 'nothing'})")
        value = record[key]
        if not isinstance(value, str):
            raise RowProblem(f"field '{key}' must be a string (as in the first row), got {type_name(value)}")
        if not value.strip():
            raise RowProblem(f"field '{key}' is empty")
        out.append(value)
    return tuple(out)


def _messages(record: dict, key: str, system_prompt: str | None = None) -> list[dict]:
    if key not in record or record[key] is None:
        raise RowProblem(f"missing field '{key}' (the row has: {', '.join(map(str, record)) or 'nothing'})")
    if not isinstance(record[key], list):
        raise RowProblem(f"field '{key}' must be a list of messages (as in the first row), got "
                         f"{type_name(record[key])}")
    try:
        messages = chat_messages({"messages": record[key]}, system_prompt)
    except RowProblem as e:
        raise RowProblem(f"field '{key}': {str(e).replace(chr(39) + 'messages' + chr(39) + ' ', '')}") from None
    if key != "prompt" and not any(m["content"].strip() for m in messages):
        raise RowProblem(f"field '{key}' has no text")
    return messages


def _chat_texts(record: dict, tokenizer, system_prompt: str | None) -> tuple[str, str, str]:
    """The prompt as the template renders it before an answer, and each answer as the text the
    template adds after it (through its end of turn)."""
    prompt = _messages(record, "prompt", system_prompt)
    try:
        before = render_chat(tokenizer, prompt, generation_prompt=True)
    except Exception as e:
        raise RowProblem(f"the chat template rejected the prompt: {e}") from None
    answers = []
    for key in ("chosen", "rejected"):
        try:
            full = render_chat(tokenizer, prompt + _messages(record, key))
        except RowProblem:
            raise
        except Exception as e:
            raise RowProblem(f"the chat template rejected the {key} conversation: {e}") from None
        if not full.startswith(before):
            raise RowProblem(
                f"the chat template renders the prompt differently when the {key} answer follows, so the "
                "answer's tokens cannot be located (give the pairs as plain strings instead)"
            )
        answers.append(full[len(before):])
    return before, answers[0], answers[1]


def _encode_pairs(tokenizer, texts: list[tuple[str, str, str]], eos: int, *, chat: bool) -> list[tuple]:
    """(prompt ids, chosen ids, rejected ids) per row: the prompt as data/tokenize.py tokenizes a
    completion row's prompt (plain: with BOS, special suffix cut) or a chat prompt (no specials)."""
    prompts = [p for p, _, _ in texts]
    if chat:
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    else:
        cut = special_suffix(tokenizer)
        prompt_ids = [ids[: len(ids) - cut] for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    eos_text = getattr(tokenizer, "eos_token", None) or ""
    out = []
    chosen_ids = tokenizer([c for _, c, _ in texts], add_special_tokens=False)["input_ids"]
    rejected_ids = tokenizer([r for _, _, r in texts], add_special_tokens=False)["input_ids"]
    for (_, c_text, r_text), p, c, r in zip(texts, prompt_ids, chosen_ids, rejected_ids):
        # EOS closes each answer, unless a chat template's end of turn already is the EOS
        c = list(c) + ([] if chat and eos_text and c_text.rstrip().endswith(eos_text) else [eos])
        r = list(r) + ([] if chat and eos_text and r_text.rstrip().endswith(eos_text) else [eos])
        out.append((list(p), c, r))
    return out


def fingerprint(*parts: list[dict]) -> str:
    digest = hashlib.sha256()
    for pairs in parts:
        for pair in pairs:
            for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
                digest.update(array("q", pair[key]).tobytes())
                digest.update(b",")
        digest.update(b"|")
    return digest.hexdigest()[:16]


def as_sft_examples(pairs: list[dict]) -> list[dict]:
    """Each pair's prompt + chosen answer as a supervised example (prompt masked): what `lora eval`
    scores the sft-style loss on."""
    return [{"input_ids": p["prompt_ids"] + p["chosen_ids"],
             "labels": [IGNORE_INDEX] * len(p["prompt_ids"]) + p["chosen_ids"]} for p in pairs]
