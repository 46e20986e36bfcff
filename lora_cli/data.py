"""Training data: records -> formatted text -> tokens + labels (prompt masked) -> packed -> train/val.

    load_records      files (.jsonl .json .csv .tsv .parquet .txt) or a hub dataset id -> list of dicts
    tokenize_records  one of four row formats -> {"input_ids", "labels"}, with -100 on every token
                      the loss must ignore (prompts, system/user turns), and max_length applied
    pack              first-fit-decreasing packing into rows of at most max_length tokens;
                      position_ids restart at 0 for each example, which is how transformers (sdpa,
                      use_cache=False, no attention_mask) keeps packed examples from attending to
                      each other
    Collator          pads a batch to its longest row
    prepare_data      all of the above, plus the train/validation split and a report

Bad input never surfaces as a traceback: every problem is a `DataError` naming the file, the row
(and the line, where the file has lines) and the fix. Bad rows are all found before any is
tokenized, and the first few are reported in one error together with how many there are.

Only the standard library is imported at module level (the CLI must start fast); tokenizers are
duck-typed, torch / pyarrow / datasets are imported where they are needed.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import hashlib
import io
import json
import random
import re
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli import datastats
from lora_cli.errors import DataError

IGNORE_INDEX = -100  # the label value the loss skips (PyTorch's cross-entropy default)
# A batch key (count_tokens=True): real tokens per row, for throughput figures; the trainer
# removes it before the model sees the batch.
REAL_TOKENS_KEY = "real_tokens"
MAX_SHOWN = 5  # bad rows quoted in one error; the rest are only counted
MAX_LISTED = 10  # truncated / dropped rows named in the data report; the rest are only counted
CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # "conversations": [{"from", "value"}]
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")

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

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZE_CHUNK = 1024  # rows per batched tokenizer call


# --------------------------------------------------------------------------- results


@dataclass
class TokenizeCounts:
    """What `tokenize_records` did to one set of rows."""

    format: str
    rows: int  # records in
    examples: int  # examples out
    truncated: int = 0
    dropped: int = 0  # longer than max_length with too_long: drop
    dropped_no_supervised: int = 0  # no token left for the loss (after truncation, if any)
    tokens: int = 0
    supervised_tokens: int = 0  # labels the loss uses (the first token of an example never is)
    longest: int = 0  # longest example before truncation
    raw_lengths: list[int] = dataclasses.field(default_factory=list)  # every row, before truncation
    lengths: list[int] = dataclasses.field(default_factory=list)  # every kept example
    truncated_where: list[str] = dataclasses.field(default_factory=list)
    dropped_where: list[str] = dataclasses.field(default_factory=list)
    no_supervised_where: list[str] = dataclasses.field(default_factory=list)
    eos_last: int = 0  # kept examples with EOS among their supervised tokens (the model learns to stop)


@dataclass
class DataReport:
    """Counts about the prepared data; `lines()` is what the user sees before training."""

    format: str
    format_detected: bool  # True when data.format was auto
    sources: list[str]
    rows: int  # records loaded from data.train
    train_records: int  # of those, the rows used for training (the rest are the val_split)
    train_rows: int  # training examples made from them (before packing)
    validation_rows: int
    validation_from: str | None  # "val_split 0.1 (seed 0)", the validation files, or None
    max_length: int
    too_long: str
    truncated: int
    dropped: int
    dropped_no_supervised: int
    train_tokens: int
    supervised_tokens: int
    longest: int
    packed_rows: int | None = None
    padding_fraction: float | None = None  # packed: share of the rows' max_length capacity left empty
    validation_truncated: int = 0
    validation_dropped: int = 0  # too long + no supervised tokens
    fingerprint: str = ""  # sha256 of every token id and label, train then validation
    notes: list[str] = dataclasses.field(default_factory=list)  # settings that had no effect, etc.
    # Token lengths of the training rows before truncation: min/median/p95/max, and
    # [[low, high, count], ...] bins (datastats.histogram).
    length_stats: dict = dataclasses.field(default_factory=dict)
    length_histogram: list = dataclasses.field(default_factory=list)
    # Which rows (first MAX_LISTED, as "file row N (line M)") were truncated, dropped as too
    # long, or dropped for having no supervised token.
    truncated_rows: list[str] = dataclasses.field(default_factory=list)
    dropped_rows: list[str] = dataclasses.field(default_factory=list)
    no_supervised_rows: list[str] = dataclasses.field(default_factory=list)
    eos_token: str = ""
    eos_supervised: int = 0  # training examples with EOS among their supervised tokens
    pad_is_eos: bool = False
    batch_size: int | None = None  # the recipe's, when prepare_data was told it
    batch_padding_fraction: float | None = None  # unpacked: padding to the longest in each batch
    packing_would_leave: float | None = None  # unpacked: the padding fraction packing would leave
    warnings: list[str] = dataclasses.field(default_factory=list)  # problems, each with its fix

    def lines(self, full: bool = False) -> list[str]:
        """The report; `full` (lora validate) adds the length histogram and the row lists."""
        return self._counts_lines() + self._detail_lines(full) + [f"warning: {w}" for w in self.warnings]

    def _detail_lines(self, full: bool) -> list[str]:
        out = []
        st = self.length_stats
        if st:
            out.append(
                f"lengths (tokens, before truncation): min {st['min']}, median {st['median']}, "
                f"p95 {st['p95']}, max {st['max']} (max_length {self.max_length})"
            )
        if full and self.length_histogram:
            out += datastats.histogram_lines(self.length_histogram, self.max_length)
        for label, rows, count in (
            ("truncated", self.truncated_rows, self.truncated),
            (f"dropped (longer than {self.max_length})", self.dropped_rows, self.dropped),
            ("dropped (no supervised tokens)", self.no_supervised_rows, self.dropped_no_supervised),
        ):
            if rows and (full or count <= 3):
                more = f" (+{count - len(rows)} more)" if count > len(rows) else ""
                out.append(f"{label}: {'; '.join(rows)}{more}")
        if self.train_rows:
            pad_note = " (pad token = EOS; labels are padded with -100 by position, so EOS stays in the loss)"
            out.append(
                f"EOS {self.eos_token!r} is supervised in {self.eos_supervised} of "
                f"{_n(self.train_rows, 'example')}" + (pad_note if self.pad_is_eos and full else "")
            )
        if self.batch_padding_fraction is not None:
            packed = (f"; data.packing: true would leave {self.packing_would_leave:.1%}"
                      if self.packing_would_leave is not None else "")
            out.append(
                f"padding: {self.batch_padding_fraction:.1%} of the tokens in shuffled batches of "
                f"{self.batch_size} are padding{packed}"
            )
        return out

    def _counts_lines(self) -> list[str]:
        detected = " (auto-detected)" if self.format_detected else ""
        out = [f"data: {_n(self.rows, 'row')} from {', '.join(self.sources)}, format {self.format}{detected}"]
        share = self.supervised_tokens / self.train_tokens if self.train_tokens else 0.0
        out.append(
            f"train: {_n(self.train_rows, 'example')}, {_n(self.train_tokens, 'token')} "
            f"({self.supervised_tokens} supervised, {share:.0%}), longest {self.longest}"
        )
        if self.validation_from:
            out.append(f"validation: {_n(self.validation_rows, 'example')} from {self.validation_from}")
        else:
            out.append("validation: none (set data.validation or data.val_split)")
        train_records = self.train_records
        if self.truncated:
            out.append(
                f"truncated {self.truncated} of {_n(train_records, 'row')} to max_length "
                f"{self.max_length} (data.too_long: truncate)"
            )
        if self.dropped:
            out.append(
                f"dropped {self.dropped} of {_n(train_records, 'row')} longer than max_length "
                f"{self.max_length} (data.too_long: drop)"
            )
        if self.dropped_no_supervised:
            out.append(
                f"dropped {self.dropped_no_supervised} of {_n(train_records, 'row')} with no supervised "
                "tokens" + (" after truncation" if self.truncated else "")
            )
        if self.validation_truncated or self.validation_dropped:
            out.append(
                f"validation: truncated {self.validation_truncated}, dropped {_n(self.validation_dropped, 'row')}"
            )
        if self.packed_rows is not None:
            out.append(
                f"packed {_n(self.train_rows, 'example')} into {_n(self.packed_rows, 'row')} of at most "
                f"{self.max_length} tokens ({1 - (self.padding_fraction or 0):.1%} full)"
            )
        return out + self.notes


@dataclass
class PreparedData:
    train: list[dict]  # {"input_ids", "labels"} (+ "position_ids" when packed)
    validation: list[dict] | None  # never packed, so eval loss is comparable across runs
    report: DataReport


# --------------------------------------------------------------------------- problems


class _Problems:
    """Collects bad rows; raises one DataError quoting the first few and counting all."""

    def __init__(self) -> None:
        self.shown: list[str] = []
        self.count = 0

    def add(self, where: str, message: str) -> None:
        self.count += 1
        if len(self.shown) < MAX_SHOWN:
            self.shown.append(f"{where}: {message}")

    def raise_if_any(self, what: str, hint: str) -> None:
        if not self.count:
            return
        if self.count == 1:
            raise DataError(self.shown[0], hint)
        more = f", first {MAX_SHOWN} shown" if self.count > MAX_SHOWN else ""
        listed = "\n".join(f"  - {s}" for s in self.shown)
        raise DataError(f"{self.count} {what}{more}:\n{listed}", hint)


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- loading


def load_records(spec: str | Path | list) -> list[dict]:
    """Rows of one file, a list of files (concatenated), or a hub dataset id."""
    return load_with_locations(spec)[0]


def load_with_locations(spec: str | Path | list) -> tuple[list[dict], list[str]]:
    """Rows plus, for each, where it came from ("data/train.jsonl row 3 (line 4)"): pass the
    second list as `tokenize_records(..., where=)` so errors point at the line."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not specs:
        raise DataError("no data files given", "set data.train to a file, a list of files or a hub dataset id")
    records: list[dict] = []
    where: list[str] = []
    for one in specs:
        r, w = _load_one(str(one))
        records += r
        where += w
    return records, where


def _load_one(spec: str) -> tuple[list[dict], list[str]]:
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_hub_id(spec):
            return _load_hub(spec)
        raise DataError(
            f"data file not found: {path.resolve()}",
            f"check the path; relative paths are relative to the current directory ({Path.cwd()})",
        )
    if path.is_dir():
        raise DataError(
            f"{spec} is a directory, not a data file",
            "name the files inside it, e.g. data.train: [dir/part1.jsonl, dir/part2.jsonl]",
        )
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        raise DataError(
            f"{spec}: unsupported file type '{path.suffix or '(no extension)'}'",
            f"use one of {' '.join(SUFFIXES)}, or a hub dataset id (owner/name)",
        )
    records, where = loader(path, spec)
    if not records:
        raise DataError(f"{spec}: no rows (the file is empty)", "add rows to the file, or remove it from the list")
    return records, where


def _looks_like_hub_id(spec: str) -> bool:
    return Path(spec).suffix == "" and bool(_HUB_ID.match(spec))


def _load_hub(spec: str) -> tuple[list[dict], list[str]]:
    try:
        import datasets

        rows = datasets.load_dataset(spec, split="train").to_list()
    except Exception as e:  # offline, unknown id, gated, no 'train' split, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"could not load hub dataset '{spec}' (and no local file of that name exists): {first}",
            "without network access (or with HF_DATASETS_OFFLINE=1) pass a local file instead: "
            + " ".join(SUFFIXES),
        ) from None
    if not rows:
        raise DataError(f"hub dataset '{spec}' has no rows in its train split")
    return rows, [f"hub dataset {spec} row {i}" for i in range(1, len(rows) + 1)]


def _read_text(path: Path, name: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror or e}", "check the file's permissions") from None
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"{name}: the file is UTF-16, not UTF-8", "save the file as UTF-8")
    for magic, kind in ((b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"), (b"\x28\xb5\x2f\xfd", "zstd")):
        if data.startswith(magic):
            raise DataError(f"{name}: the file is {kind}-compressed", "decompress it first")
    skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark is fine
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + skip
        line = data[:offset].count(b"\n") + 1
        raise DataError(
            f"{name}: not valid UTF-8 at byte {offset} (line {line}): byte 0x{data[offset]:02x}",
            "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`)",
        ) from None


def _lines(text: str) -> list[str]:
    # Not str.splitlines(): that also splits on U+2028 and friends, which JSON strings may hold raw.
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _load_jsonl(path: Path, name: str) -> tuple[list[dict], list[str]]:
    records, where = [], []
    problems = _Problems()
    lines = _lines(_read_text(path, name))
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.add(f"{name} line {lineno}", f"not valid JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(obj, dict):
            problems.add(f"{name} line {lineno}", f"expected a JSON object {{...}}, got {_type_name(obj)}")
            continue
        records.append(obj)
        where.append(f"{name} row {len(records)} (line {lineno})")
    first = next((line.strip() for line in lines if line.strip()), "")
    if first in ("[", "{") or (first.startswith("[") and problems.count):
        hint = ("this looks like one JSON document spread over many lines: name the file .json, "
                "or write one complete object per line")
    else:
        hint = 'each non-blank line of a .jsonl file must be one complete JSON object, e.g. {"text": "..."}'
    problems.raise_if_any(f"bad lines in {name}", hint)
    return records, where


def _load_json(path: Path, name: str) -> tuple[list[dict], list[str]]:
    text = _read_text(path, name)
    if not text.strip():
        return [], []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "fix the JSON syntax at that position"
        if e.msg == "Extra data":
            hint = "the file holds more than one JSON value: if it has one object per line, name it .jsonl"
        raise DataError(f"{name} line {e.lineno} column {e.colno}: not valid JSON: {e.msg}", hint) from None
    if isinstance(obj, dict):
        key = next((k for k in ("data", "train") if isinstance(obj.get(k), list)), None)
        if key is None:
            raise DataError(
                f"{name}: expected a list of objects, or an object with a \"data\" or \"train\" list; "
                f"found an object with keys {', '.join(map(str, list(obj)[:10])) or '(none)'}",
                "write the rows as a JSON list: [{...}, {...}]",
            )
        obj = obj[key]
    if not isinstance(obj, list):
        raise DataError(f"{name}: expected a list of objects, got {_type_name(obj)}",
                        "write the rows as a JSON list: [{...}, {...}]")
    problems = _Problems()
    for i, row in enumerate(obj, 1):
        if not isinstance(row, dict):
            problems.add(f"{name} row {i}", f"expected an object {{...}}, got {_type_name(row)}")
    problems.raise_if_any(f"bad rows in {name}", "every element of the list must be an object {...}")
    return obj, [f"{name} row {i}" for i in range(1, len(obj) + 1)]


def _load_csv(path: Path, name: str, delimiter: str = ",") -> tuple[list[dict], list[str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts are normal in training data
    reader = csv.reader(io.StringIO(_read_text(path, name), newline=""), delimiter=delimiter, strict=True)
    quote_hint = "quote fields that contain the delimiter, quotes or newlines (\"...\", with \"\" inside)"
    records, where = [], []
    problems = _Problems()
    try:
        header = next(reader, None)
        if header is None:
            return [], []
        header = [h.strip() for h in header]
        duplicates = sorted({h for h in header if h and header.count(h) > 1})
        if duplicates:
            raise DataError(f"{name} line 1: duplicate column names: {', '.join(duplicates)}",
                            "give every column a distinct name")
        while True:
            line = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                break
            if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
                continue  # blank line
            if len(row) != len(header):
                problems.add(f"{name} row {len(records) + 1} (line {line})",
                             f"has {len(row)} fields, the header has {len(header)}")
                continue
            records.append({h: v for h, v in zip(header, row) if h})  # unnamed columns: spreadsheet residue
            where.append(f"{name} row {len(records)} (line {line})")
    except csv.Error as e:
        raise DataError(f"{name} line {reader.line_num}: not valid CSV: {e}", quote_hint) from None
    problems.raise_if_any(f"bad rows in {name}", quote_hint)
    return records, where


def _load_tsv(path: Path, name: str) -> tuple[list[dict], list[str]]:
    return _load_csv(path, name, delimiter="\t")


def _load_parquet(path: Path, name: str) -> tuple[list[dict], list[str]]:
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    except ImportError:
        raise DataError(f"{name}: reading Parquet needs pyarrow", "pip install pyarrow") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{name}: cannot read as Parquet: {first}",
                        "check that the file is a Parquet file (e.g. written by pandas.DataFrame.to_parquet)") from None
    return rows, [f"{name} row {i}" for i in range(1, len(rows) + 1)]


def _load_txt(path: Path, name: str) -> tuple[list[dict], list[str]]:
    """One {"text"} record per paragraph; paragraphs are separated by blank lines."""
    records, where = [], []
    paragraph: list[str] = []
    start = 0
    for lineno, line in enumerate([*_lines(_read_text(path, name)), ""], 1):
        if line.strip():
            if not paragraph:
                start = lineno
            paragraph.append(line)
        elif paragraph:
            records.append({"text": "\n".join(paragraph)})
            where.append(f"{name} paragraph {len(records)} (line {start})")
            paragraph = []
    return records, where


_LOADERS = {
    ".jsonl": _load_jsonl,
    ".json": _load_json,
    ".csv": _load_csv,
    ".tsv": _load_tsv,
    ".parquet": _load_parquet,
    ".txt": _load_txt,
}


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
        raise _Bad(f"field '{key}' must be a string, got {_type_name(value)}")
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
        raise _Bad(f"field '{key}' must be a list of messages, got {_type_name(messages)}")
    if not messages:
        raise _Bad(f"field '{key}' is an empty list")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Bad(f"message {j}: must be an object {{\"role\", \"content\"}}, got {_type_name(m)}")
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
            raise _Bad(f"message {j}: " + ("missing 'role'" if role is None else f"'role' must be a string, got {_type_name(role)}"))
        if role not in CHAT_ROLES:
            raise _Bad(f"message {j}: unknown role '{role}' (allowed roles: {', '.join(CHAT_ROLES)})")
        if "content" not in m and m.get("tool_calls"):
            m["content"] = ""  # an assistant turn that only calls tools
        if "content" not in m:
            raise _Bad(f"message {j}: " + ("'content' must be a string, got null" if null_content else "missing 'content'"))
        if not isinstance(m["content"], str):
            raise _Bad(f"message {j}: 'content' must be a string, got {_type_name(m['content'])}")
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

    problems = _Problems()
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
    too_long = _Problems()
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
            f"{source}: no examples left out of {_n(len(records), 'row')} ({counts.dropped} longer than "
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
    _add_details(report, counts, tokenizer, seed=seed, batch_size=batch_size)
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


def _add_details(report: DataReport, counts: TokenizeCounts, tokenizer, *, seed: int, batch_size: int | None) -> None:
    """Length distribution, which rows were cut, and whether examples teach the model to stop."""
    report.length_stats = datastats.summary(counts.raw_lengths)
    report.length_histogram = datastats.histogram(counts.raw_lengths, report.max_length)
    report.truncated_rows = counts.truncated_where[:MAX_LISTED]
    report.dropped_rows = counts.dropped_where[:MAX_LISTED]
    report.no_supervised_rows = counts.no_supervised_where[:MAX_LISTED]
    report.eos_token = str(tokenizer.eos_token)
    report.eos_supervised = counts.eos_last
    report.pad_is_eos = tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
    # Truncated examples lose their EOS by design (the report lists them); any other example
    # without a supervised EOS teaches the model never to stop.
    missing = report.train_rows - counts.eos_last - counts.truncated
    if missing > 0:
        cause = (" (the pad token is EOS: something masked it like padding)" if report.pad_is_eos else "")
        report.warnings.append(
            f"{missing} of {_n(report.train_rows, 'example')} have no supervised "
            f"EOS {report.eos_token!r}{cause}: the model will not learn to stop. Fix: make sure answers "
            "end with the EOS token (for chat data, the template's end-of-turn token must be the "
            "tokenizer's eos_token), or set data.train_on_prompt / check the data format"
        )


def _fingerprint(*parts: list[dict]) -> str:
    digest = hashlib.sha256()
    for examples in parts:
        for ex in examples:
            digest.update(array("q", ex["input_ids"]).tobytes())
            digest.update(array("q", ex["labels"]).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]
