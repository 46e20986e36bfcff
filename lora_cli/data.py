"""Training data: records -> formatted text -> tokens + labels (prompt masked) -> packed -> train/val.

    load_records      files (.jsonl .json .csv .tsv .parquet .txt) or a hub dataset id -> list of
                      dicts (lora_cli/records.py; re-exported here)
    tokenize_records  one of four row formats -> {"input_ids", "labels"}, with -100 on every token
                      the loss must ignore (prompts, system/user turns), and max_length applied
    pack              first-fit-decreasing packing into rows of at most max_length tokens;
                      position_ids restart at 0 for each example, which is how transformers (sdpa,
                      use_cache=False, no attention_mask) keeps packed examples from attending to
                      each other
    Collator          pads a batch to its longest row
    prepare_data      all of the above, plus the train/validation split and a report
                      (lora_cli/datareport.py)

Bad input never surfaces as a traceback: every problem is a `DataError` naming the file, the row
(and the line, where the file has lines) and the fix. Bad rows are all found before any is
tokenized, and the first few are reported in one error together with how many there are.

Only the standard library is imported at module level (the CLI must start fast); tokenizers are
duck-typed, torch / pyarrow / datasets are imported where they are needed.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import random
from array import array
from dataclasses import dataclass
from pathlib import Path

from lora_cli.errors import DataError
from lora_cli import datastats
from lora_cli.datareport import DataReport, TokenizeCounts, add_details
from lora_cli.records import Problems, load_records, load_with_locations, plural, type_name  # noqa: F401 (load_records: re-exported)

IGNORE_INDEX = -100  # the label value the loss skips (PyTorch's cross-entropy default)
# A batch key (count_tokens=True): real tokens per row, for throughput figures; the trainer
# removes it before the model sees the batch.
REAL_TOKENS_KEY = "real_tokens"
CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # "conversations": [{"from", "value"}]

# The columns that identify each format, in the order `auto` tries them.
FORMAT_COLUMNS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
FORMAT_HELP = {
    "chat": 'chat rows need "messages": a list of {"role", "content"} objects, content a string '
    '(ShareGPT rows, "conversations" of {"from", "value"}, are read too)',
    "alpaca": 'alpaca rows need string fields "instruction" and "output" (and optionally "input")',
    "completion": 'completion rows need string fields "prompt" and "completion"',
    "text": 'text rows need a string field "text"',
}
FORMATS_LINE = (
    "chat {messages}; alpaca {instruction, input (optional), output}; "
    "completion {prompt, completion}; text {text}"
)

# Stanford Alpaca's prompt templates (github.com/tatsu-lab/stanford_alpaca, train.py).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

_TOKENIZE_CHUNK = 1024  # rows per batched tokenizer call


# --------------------------------------------------------------------------- results


@dataclass
class PreparedData:
    train: list[dict]  # {"input_ids", "labels"} (+ "position_ids" when packed)
    validation: list[dict] | None  # never packed, so eval loss is comparable across runs
    report: DataReport


# --------------------------------------------------------------------------- formats


def detect_format(record: dict, where: str) -> str:
    """The format whose columns the record has (chat, alpaca, completion, text, in that order)."""
    for fmt, columns in FORMAT_COLUMNS.items():
        if all(c in record for c in columns):
            return fmt
    if "conversations" in record:  # ShareGPT
        return "chat"
    found = ", ".join(map(str, record)) or "(none)"
    raise DataError(
        f"{where}: cannot tell the data format from the columns: {found}",
        f"rename the columns to one of the formats: {FORMATS_LINE}; or set data.format",
    )


def _string(record: dict, key: str, optional: bool = False) -> str:
    if key not in record or (optional and record[key] is None):
        if optional:
            return ""
        raise _Bad(f"missing field '{key}' (the row has: {', '.join(map(str, record)) or 'nothing'})")
    value = record[key]
    if not isinstance(value, str):
        raise _Bad(f"field '{key}' must be a string, got {type_name(value)}")
    return value


class _Bad(Exception):
    """One row's problem; collected into a DataError."""


def _messages(record: dict, system_prompt: str | None) -> list[dict]:
    key = "conversations" if "messages" not in record and "conversations" in record else "messages"
    if key not in record:
        raise _Bad(f"missing field 'messages' (the row has: {', '.join(map(str, record)) or 'nothing'})")
    messages = record[key]
    if isinstance(messages, str):  # CSV cells hold JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise _Bad(f"field '{key}' is a string that is not a JSON list of messages") from None
    if not isinstance(messages, list):
        raise _Bad(f"field '{key}' must be a list of messages, got {type_name(messages)}")
    if not messages:
        raise _Bad(f"field '{key}' is an empty list")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Bad(f"message {j}: must be an object {{\"role\", \"content\"}}, got {type_name(m)}")
        null_content = m.get("content", "") is None and not m.get("tool_calls")
        # Parquet/hub rows carry every struct key, null where absent; templates test `is defined`.
        m = {k: v for k, v in m.items() if v is not None}
        if "role" not in m and "from" in m:  # ShareGPT
            m["role"] = SHAREGPT_ROLES.get(m["from"], m["from"])
            if "content" not in m and "value" in m:
                m["content"] = m.pop("value")
            m.pop("from")
        role = m.get("role")
        if not isinstance(role, str):
            raise _Bad(f"message {j}: " + ("missing 'role'" if role is None else f"'role' must be a string, got {type_name(role)}"))
        if role not in CHAT_ROLES:
            raise _Bad(f"message {j}: unknown role '{role}' (allowed roles: {', '.join(CHAT_ROLES)})")
        if "content" not in m and m.get("tool_calls"):
            m["content"] = ""  # an assistant turn that only calls tools
        if "content" not in m:
            raise _Bad(f"message {j}: " + ("'content' must be a string, got null" if null_content else "missing 'content'"))
        if not isinstance(m["content"], str):
            raise _Bad(f"message {j}: 'content' must be a string, got {type_name(m['content'])}")
        out.append(m)
    if system_prompt and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):  # some versions wrap a single render in a list
        text = text[0]
    return text


def _chat_render(tokenizer, messages: list[dict], train_on_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character spans of the assistant turns.

    An assistant turn runs from the end of the generation prompt before it to where the next
    message's render starts, so the template's end-of-turn tokens are learned too.
    """
    try:
        full = _render(tokenizer, messages)
    except Exception as e:
        raise _Bad(f"the chat template rejected this conversation: {e}") from None
    if train_on_prompt:
        return full, [(0, len(full))]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            through = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1])
        except Exception as e:
            raise _Bad(f"the chat template rejected this conversation: {e}") from None
        try:
            before = _render(tokenizer, messages[:i], generation_prompt=True)
        except Exception:
            # Templates (and transformers) refuse an empty conversation: for a conversation that
            # opens with the assistant, its turn starts where its content does.
            at = through.find(m["content"]) if m["content"] else -1
            before = through[:at] if at >= 0 else ""
        if not through.startswith(before) or not full.startswith(through):
            raise _Bad(
                f"message {i}: the chat template renders this turn differently depending on what "
                "follows, so the assistant's tokens cannot be located (use data.train_on_prompt: "
                "true, or format: completion)"
            )
        spans.append((len(before), len(through)))
    return full, spans


def _normalize(fmt: str, record: dict) -> tuple[str | None, str]:
    """(prompt, answer) for completion/alpaca; (None, text) for text."""
    if fmt == "text":
        return None, _string(record, "text")
    if fmt == "completion":
        return _string(record, "prompt"), _string(record, "completion")
    if fmt == "alpaca":
        instruction, output = _string(record, "instruction"), _string(record, "output")
        inp = _string(record, "input", optional=True)
        template = ALPACA_PROMPT if inp.strip() else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=instruction, input=inp), output
    raise ValueError(fmt)


# --------------------------------------------------------------------------- tokenizing


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
    eos = _eos_id(tokenizer)
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
                messages = _messages(record, cfg.system_prompt)
                text, spans = _chat_render(tokenizer, messages, cfg.train_on_prompt)
                parts.append((text, spans, messages[-1]["role"] == "assistant"))
            else:
                parts.append(_normalize(fmt, record))
        except _Bad as e:
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
        supervised = _supervised(labels)
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


def _supervised(labels: list[int]) -> int:
    # A causal LM predicts token t from tokens < t: the first label is never used.
    return max(0, len(labels) - 1 - labels.count(IGNORE_INDEX) + (labels[:1] == [IGNORE_INDEX]))


def _eos_id(tokenizer) -> int:
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
    cut = _special_suffix(tokenizer)
    pairs = []
    for p, a in zip(firsts, answers):
        p = p[: len(p) - cut]
        ids = p + a + [eos]
        supervise_prompt = is_text or train_on_prompt
        labels = list(ids) if supervise_prompt else [IGNORE_INDEX] * len(p) + a + [eos]
        pairs.append((ids, labels))
    return pairs


def _special_suffix(tokenizer) -> int:
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


# --------------------------------------------------------------------------- packing


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """First-fit decreasing into rows of at most max_length tokens; deterministic.

    Each row's position_ids restart at 0 where an example starts: with no attention_mask,
    transformers reads those restarts as sequence boundaries, so examples never attend to each
    other. The first label of every example is -100, as it is (unused) in an unpacked row; so
    every example's loss is the same packed or not.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    # A max-tree over the remaining capacity of bins 0..size-1 finds the first bin that fits in
    # O(log n); unopened bins have full capacity, so "first fit" opens a new bin when needed.
    size = 1
    while size < max(1, len(examples)):
        size *= 2
    tree = [max_length] * (2 * size)
    bins: list[list[int]] = []
    for i in order:
        length = len(examples[i]["input_ids"])
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        b = node - size
        tree[node] -= length
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
    rows = []
    for members in bins:
        ids, labels, positions = [], [], []
        for i in sorted(members):
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [IGNORE_INDEX, *ex["labels"][1:]]
            positions += range(len(ex["input_ids"]))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return rows


class Collator:
    """Pads a batch to its longest row (right padding): input_ids with pad_token_id, labels with -100.

    Unpacked rows get an attention_mask. Packed rows (with position_ids) get none, on purpose: the
    model then separates examples by where position_ids restart; padding forms its own segment.
    pad_to_multiple_of rounds the length up (GPU kernels prefer multiples of 8).
    """

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None, count_tokens: bool = False):
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.multiple = pad_to_multiple_of or 1
        self.count_tokens = count_tokens

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        longest = -(-longest // self.multiple) * self.multiple
        packed = any("position_ids" in f for f in features)
        ids, labels, extra = [], [], []
        for f in features:
            n = len(f["input_ids"])
            pad = longest - n
            ids.append([*f["input_ids"], *[self.pad_token_id] * pad])
            labels.append([*f["labels"], *[IGNORE_INDEX] * pad])
            if packed:
                extra.append([*f.get("position_ids", range(n)), *range(pad)])
            else:
                extra.append([1] * n + [0] * pad)
        batch = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        batch["position_ids" if packed else "attention_mask"] = torch.tensor(extra, dtype=torch.long)
        if self.count_tokens:  # packed rows have no attention_mask to count their padding by
            batch[REAL_TOKENS_KEY] = torch.tensor([len(f["input_ids"]) for f in features], dtype=torch.long)
        return batch


# --------------------------------------------------------------------------- the whole thing


def prepare_data(
    cfg, tokenizer, *, seed: int, validation_override: str | list[str] | None = None, batch_size: int | None = None
) -> PreparedData:
    """Load, format, tokenize, split and (if cfg.packing) pack the training data.

    Validation rows (cfg.validation, validation_override, or a seeded cfg.val_split of the
    training rows) must have the training rows' format; they are tokenized the same way and never
    packed. The training rows keep their file order; the trainer shuffles.
    """
    _eos_id(tokenizer)
    records, where = load_with_locations(cfg.train)
    sources = [str(s) for s in ([cfg.train] if isinstance(cfg.train, (str, Path)) else cfg.train)]
    detected = cfg.format == "auto"
    fmt = detect_format(records[0], where[0]) if detected else cfg.format
    cfg = dataclasses.replace(cfg, format=fmt)  # validation rows must have the same format
    n_records = len(records)

    val_spec = validation_override if validation_override is not None else cfg.validation
    val_records = val_where = None
    val_from = None
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
        held = set(random.Random(seed).sample(range(n_records), k))
        val_records = [r for i, r in enumerate(records) if i in held]
        val_where = [w for i, w in enumerate(where) if i in held]
        records = [r for i, r in enumerate(records) if i not in held]
        where = [w for i, w in enumerate(where) if i not in held]
        val_from = f"the training rows (val_split {cfg.val_split}, seed {seed})"

    train, counts = tokenize_records(records, cfg, tokenizer, source=", ".join(sources), where=where)
    validation, vcounts = None, None
    if val_records is not None:
        validation, vcounts = tokenize_records(
            val_records, cfg, tokenizer, source=f"validation ({val_from})", where=val_where
        )

    report = DataReport(
        format=fmt, format_detected=detected, sources=sources, rows=n_records, train_records=len(records),
        train_rows=len(train), validation_rows=len(validation or []), validation_from=val_from,
        max_length=cfg.max_length, too_long=cfg.too_long, truncated=counts.truncated,
        dropped=counts.dropped, dropped_no_supervised=counts.dropped_no_supervised,
        train_tokens=counts.tokens, supervised_tokens=counts.supervised_tokens, longest=counts.longest,
        validation_truncated=vcounts.truncated if vcounts else 0,
        validation_dropped=(vcounts.dropped + vcounts.dropped_no_supervised) if vcounts else 0,
        fingerprint=_fingerprint(train, validation or []),
    )
    if cfg.system_prompt and fmt != "chat":
        report.notes.append(f"data.system_prompt is not used: it applies to chat data, and this data is {fmt}")
    add_details(report, counts, tokenizer, seed=seed, batch_size=batch_size)
    if cfg.packing:
        train = pack(train, cfg.max_length)
        report.packed_rows = len(train)
        report.padding_fraction = 1 - counts.tokens / (len(train) * cfg.max_length)
    elif batch_size:
        report.batch_size = batch_size
        report.batch_padding_fraction = datastats.batch_padding(counts.lengths, batch_size, seed)
        rows = len(pack([{"input_ids": [0] * n, "labels": [0] * n} for n in counts.lengths], cfg.max_length))
        report.packing_would_leave = 1 - counts.tokens / (rows * cfg.max_length)
    return PreparedData(train=train, validation=validation, report=report)


def _fingerprint(*parts: list[dict]) -> str:
    digest = hashlib.sha256()
    for examples in parts:
        for ex in examples:
            digest.update(array("q", ex["input_ids"]).tobytes())
            digest.update(array("q", ex["labels"]).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def check_max_length(max_length: int, config) -> str | None:
    """data.max_length against the model's context (`config`: the model's config); shared by
    `lora train` and `lora validate`.

    A model with learned absolute positions (GPT-2's n_positions, OPT, GPT-Neo: no RoPE or ALiBi in
    its config) has no embedding past its context, so a longer row crashes mid-run: a RecipeError
    (exit 2) now. A RoPE / ALiBi model computes any position but never trained past its context:
    returns the warning to show. None when max_length fits.
    """
    from lora_cli.errors import RecipeError
    from lora_cli.estimate import model_context

    context = model_context(config)
    if context is None or max_length <= context:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    settings = text.to_dict()
    computed = getattr(text, "position_embedding_type", None) == "rotary" or any(
        value and any(word in key for word in ("rope", "rotary", "alibi")) for key, value in settings.items()
    )
    if computed:
        return (f"data.max_length {max_length} is beyond the model's context of {context} tokens "
                f"(max_position_embeddings): positions past it were never trained. Fix: data.max_length={context} or less")
    name = "n_positions" if "n_positions" in settings else "max_position_embeddings"
    raise RecipeError(
        "data.max_length",
        [f"{max_length} is beyond the model's context of {context} tokens ({name}): the model learned one "
         f"position embedding per token up to {context}, so longer rows cannot run"],
        f"Set data.max_length={context} or less (data.too_long decides what happens to longer examples).",
    )


def check_model_context(model_cfg, max_length: int) -> str | None:
    """check_max_length for the recipe's model, read from its config (never the weights). A config
    that cannot be read is left for the model load to report."""
    from lora_cli.errors import LoraError
    from lora_cli.estimate import load_model_config

    try:
        config = load_model_config(model_cfg)
    except LoraError:
        return None
    return check_max_length(max_length, config)
