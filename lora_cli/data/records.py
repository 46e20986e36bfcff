"""Reading training rows from files (.jsonl .json .csv .tsv .parquet .txt) or a hub dataset id.

Every row comes with where it came from ("data/train.jsonl row 3 (line 4)"), so later errors can
point at the line. Bad input is a `DataError` naming the file, row and fix; `Problems` collects
bad rows so one error reports the first few and counts them all.

Only the standard library is imported at module level (the CLI must start fast).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import sys
from pathlib import Path

from lora_cli.console import first_line, type_name
from lora_cli.errors import DataError
from lora_cli.hub import looks_like_hub_id
from lora_cli.recipe.schema import DataSource

MAX_SHOWN = 5  # bad rows quoted in one error; the rest are only counted
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")


# --------------------------------------------------------------------------- problems


class Problems:
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
    for i, one in enumerate(specs):
        if isinstance(one, DataSource):  # an entry of a mix (data/mixing.py): its rows, in turn
            r, w = load_source(one.path, split=one.split, name=f"data.train[{i}]")
            r, w = r[: one.max_rows], w[: one.max_rows]
        else:
            r, w = _load_one(str(one))
        records += r
        where += w
    return records, where


def load_source(spec: str, *, split: str | None = None, name: str = "data.train") -> tuple[list[dict], list[str]]:
    """The rows of one file or hub dataset (`split`: a hub dataset's split; `name` says which
    entry of the recipe asked for it, in the error when a local file is given a split)."""
    _check_source(spec, split=split, name=name)
    return _load_one(spec, split=split)


def check_sources(spec: str | Path | list | None, name: str = "data.train") -> None:
    """Every file `spec` names exists, is a file and has a type we read (a hub id is taken on
    trust): a typo in a path is said in a blink, before a tokenizer is loaded or a row read."""
    for i, one in enumerate([spec] if isinstance(spec, (str, Path)) else list(spec or [])):
        if isinstance(one, DataSource):
            _check_source(one.path, split=one.split, name=f"{name}[{i}]")
        else:
            _check_source(str(one))


def _check_source(spec: str, split: str | None = None, name: str = "data.train") -> bool:
    """The errors of a path that cannot be read (True: it is a hub dataset id)."""
    path = Path(spec).expanduser()
    if split is not None and path.exists():
        raise DataError(
            f"{name}.split: {spec} is a local file, and split ({split}) applies to hub datasets",
            f"remove split from {name}, or name the file that holds the rows you want",
        )
    if not path.exists():
        # `data/chat` for data/chat.jsonl would otherwise be tried on the hub (slow retries, then
        # an error about the hub)
        near = sorted(str(p) for p in path.parent.glob(f"{glob.escape(path.name)}.*") if p.suffix.lower() in _LOADERS)
        if near:
            raise DataError(
                f"data file not found: {spec}", f"did you mean {' or '.join(near)}? Data files need their extension"
            )
        if _looks_like_hub_id(spec):
            return True
        raise DataError(
            f"data file not found: {path.resolve()}",
            f"check the path; relative paths are relative to the current directory ({Path.cwd()})",
        )
    if path.is_dir():
        raise DataError(
            f"{spec} is a directory, not a data file",
            "name the files inside it, e.g. data.train: [dir/part1.jsonl, dir/part2.jsonl]",
        )
    if path.suffix.lower() not in _LOADERS:
        raise DataError(
            f"{spec}: unsupported file type '{path.suffix or '(no extension)'}'",
            f"use one of {' '.join(SUFFIXES)}, or a hub dataset id (owner/name)",
        )
    return False


def _load_one(spec: str, split: str | None = None) -> tuple[list[dict], list[str]]:
    if _check_source(spec):
        return _load_hub(spec, split or "train")
    path = Path(spec).expanduser()
    records, where = _LOADERS[path.suffix.lower()](path, spec)
    if not records:
        empty = (
            "only a header"
            if path.suffix.lower() in (".csv", ".tsv") and path.read_text(errors="replace").strip()
            else "the file is empty"
        )
        raise DataError(f"{spec}: no rows ({empty})", "add rows to the file, or leave it out of the data")
    return records, where


def _looks_like_hub_id(spec: str) -> bool:
    return Path(spec).suffix == "" and looks_like_hub_id(spec)


def _load_hub(spec: str, split: str = "train") -> tuple[list[dict], list[str]]:
    try:
        import datasets

        rows = datasets.load_dataset(spec, split=split).to_list()
    except Exception as e:  # offline, unknown id, gated, no such split, ...
        raise DataError(
            f"could not load hub dataset '{spec}' (and no local file of that name exists): {first_line(e)}",
            "without network access (or with HF_DATASETS_OFFLINE=1) pass a local file instead: " + " ".join(SUFFIXES),
        ) from None
    if not rows:
        raise DataError(f"hub dataset '{spec}' has no rows in its {split} split")
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
    problems = Problems()
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
            problems.add(f"{name} line {lineno}", f"expected a JSON object {{...}}, got {type_name(obj)}")
            continue
        records.append(obj)
        where.append(f"{name} row {len(records)} (line {lineno})")
    first = next((line.strip() for line in lines if line.strip()), "")
    if first in ("[", "{") or (first.startswith("[") and problems.count):
        hint = (
            "this looks like one JSON document spread over many lines: name the file .json, "
            "or write one complete object per line"
        )
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
        raise DataError(
            f"{name}: expected a list of objects, got {type_name(obj)}", "write the rows as a JSON list: [{...}, {...}]"
        )
    problems = Problems()
    for i, row in enumerate(obj, 1):
        if not isinstance(row, dict):
            problems.add(f"{name} row {i}", f"expected an object {{...}}, got {type_name(row)}")
    problems.raise_if_any(f"bad rows in {name}", "every element of the list must be an object {...}")
    return obj, [f"{name} row {i}" for i in range(1, len(obj) + 1)]


def _load_csv(path: Path, name: str, delimiter: str = ",") -> tuple[list[dict], list[str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts are normal in training data
    reader = csv.reader(io.StringIO(_read_text(path, name), newline=""), delimiter=delimiter, strict=True)
    quote_hint = "quote fields that contain the delimiter, quotes or newlines (\"...\", with \"\" inside)"
    records, where = [], []
    problems = Problems()
    try:
        header = next(reader, None)
        if header is None:
            return [], []
        header = [h.strip() for h in header]
        duplicates = sorted({h for h in header if h and header.count(h) > 1})
        if duplicates:
            raise DataError(
                f"{name} line 1: duplicate column names: {', '.join(duplicates)}", "give every column a distinct name"
            )
        while True:
            line = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                break
            if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
                continue  # blank line
            if len(row) != len(header):
                problems.add(
                    f"{name} row {len(records) + 1} (line {line})",
                    f"has {len(row)} fields, the header has {len(header)}",
                )
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
        raise DataError(
            f"{name}: cannot read as Parquet: {first_line(e)}",
            "check that the file is a Parquet file (e.g. written by pandas.DataFrame.to_parquet)",
        ) from None
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
