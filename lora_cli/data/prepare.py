"""All of the data path for a recipe: load the rows, detect their format, hold out the
validation split, tokenize, pack, and report on the result (data/report.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from array import array
from dataclasses import dataclass
from pathlib import Path

from lora_cli.data import stats
from lora_cli.data.formats import detect_format
from lora_cli.data.mixing import Mixed, is_mix, prepare_mix
from lora_cli.data.packing import pack
from lora_cli.data.records import load_with_locations
from lora_cli.data.report import DataReport, add_details
from lora_cli.data.tokenize import eos_id, tokenize_records
from lora_cli.errors import DataError


@dataclass
class PreparedData:
    train: list[dict]  # {"input_ids", "labels"} (+ "position_ids" when packed)
    validation: list[dict] | None  # never packed, so eval loss is comparable across runs
    report: DataReport
    # A mix (data/mixing.py): its first examples, unpacked, with the row each came from (the preview).
    preview: list[tuple[dict, str]] = dataclasses.field(default_factory=list)


def prepare_data(
    cfg, tokenizer, *, seed: int, validation_override: str | list[str] | None = None, batch_size: int | None = None
) -> PreparedData:
    """Load, format, tokenize, split and (if cfg.packing) pack the training data.

    Validation rows (cfg.validation, validation_override, or a seeded cfg.val_split of the
    training rows) must have the training rows' format; they are tokenized the same way and never
    packed. The training rows keep their file order; the trainer shuffles. A list of {path,
    weight, ...} entries is mixed by data/mixing.py.
    """
    eos_id(tokenizer)  # a tokenizer without EOS: said before any file is read
    if is_mix(cfg.train):
        mixed = prepare_mix(cfg, tokenizer, seed=seed, validation_override=validation_override)
        return _finish(_mix_report(mixed, cfg, seed), mixed.train, mixed.validation, mixed.counts, cfg, tokenizer,
                       seed=seed, batch_size=batch_size, preview=mixed.preview)
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
    return _finish(report, train, validation, counts, cfg, tokenizer, seed=seed, batch_size=batch_size)


def _mix_report(mixed: Mixed, cfg, seed: int) -> DataReport:
    vcounts = mixed.validation_counts
    weighted = all(s.entry.weight is not None for s in mixed.sources)
    return DataReport(
        format=mixed.format, format_detected=mixed.format_detected, sources=[s.entry.path for s in mixed.sources],
        rows=mixed.rows, train_records=mixed.train_records, train_rows=len(mixed.train),
        validation_rows=len(mixed.validation or []), validation_from=mixed.validation_from,
        max_length=cfg.max_length, too_long=cfg.too_long, truncated=mixed.counts.truncated,
        dropped=mixed.counts.dropped, dropped_no_supervised=mixed.counts.dropped_no_supervised,
        train_tokens=mixed.counts.tokens, supervised_tokens=mixed.counts.supervised_tokens,
        longest=mixed.counts.longest,
        validation_truncated=vcounts.truncated if vcounts else 0,
        validation_dropped=(vcounts.dropped + vcounts.dropped_no_supervised) if vcounts else 0,
        fingerprint=_fingerprint(mixed.train, mixed.validation or []),
        mix=[s.summary(len(mixed.train)) for s in mixed.sources],
        mix_stopping=cfg.mix_stopping if weighted else None, mix_seed=seed if weighted else None,
    )


def _finish(report: DataReport, train: list[dict], validation: list[dict] | None, counts, cfg, tokenizer, *,
            seed: int, batch_size: int | None, preview=()) -> PreparedData:
    """Notes, the report's details, and packing (or the padding it would save)."""
    fmt = report.format
    if cfg.system_prompt and "chat" not in fmt.split("+"):
        report.notes.append(f"data.system_prompt is not used: it applies to chat data, and this data is {fmt}")
    add_details(report, counts, tokenizer, seed=seed, batch_size=batch_size)
    if cfg.packing:
        train = pack(train, cfg.max_length)
        report.packed_rows = len(train)
        report.padding_fraction = 1 - counts.tokens / (len(train) * cfg.max_length)
    elif batch_size:
        report.batch_size = batch_size
        report.batch_padding_fraction = stats.batch_padding(counts.lengths, batch_size, seed)
        rows = len(pack([{"input_ids": [0] * n, "labels": [0] * n} for n in counts.lengths], cfg.max_length))
        report.packing_would_leave = 1 - counts.tokens / (rows * cfg.max_length)
    return PreparedData(train=train, validation=validation, report=report, preview=list(preview))


def _fingerprint(*parts: list[dict]) -> str:
    digest = hashlib.sha256()
    for examples in parts:
        for ex in examples:
            digest.update(array("q", ex["input_ids"]).tobytes())
            digest.update(array("q", ex["labels"]).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]

