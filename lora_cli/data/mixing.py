"""Training sources mixed by weight: `data.train` as a list of {path, weight, format, split, max_rows}.

Each source is read on its own (its first `max_rows` rows; `split` of a hub dataset), has its
`data.val_split` held out (per source, so a validation row is never trained on, whatever the mix
repeats), and is formatted and tokenized with its own format. The sources' examples are then
interleaved by HF datasets' `interleave_datasets`, with probabilities = weight / sum of weights and
the run's seed. Each source's examples are shuffled (seeded) first: interleave takes them in
order, and the part of a source a mix leaves out must be a random sample, not the end of a file.

What one epoch is, `data.mix_stopping` (interleave's stopping_strategy):
  first_exhausted (default)  the mix ends when the first source runs out: no example repeats
                 within an epoch; the source with the fewest examples per unit of weight is used
                 whole and the others are sampled (sizes n_i, shares p_i: about min n_i / p_i
                 examples in all).
  all_exhausted  the mix ends once every source has been used whole: the others repeat
                 (about max n_i / p_i examples; a small source with a large weight repeats often).
The mix is drawn once per run: with train.epochs > 1 every epoch trains on the same examples,
in a new order.

Entries without weights are every example of each source once, in turn: a list of files with a
format, split or row limit per file.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from lora_cli.console import plural
from lora_cli.data.formats import detect_format
from lora_cli.data.records import load_source, load_with_locations
from lora_cli.data.report import TokenizeCounts
from lora_cli.data.tokenize import eos_id, supervised_count, tokenize_records
from lora_cli.errors import DataError
from lora_cli.recipe.schema import DataSource

PREVIEW_EXAMPLES = 10  # the first examples of the mix kept with their row, for `lora validate --preview`


def is_mix(spec) -> bool:
    """Is data.train a list of {path, ...} entries (this module), not a file or a list of files?"""
    return isinstance(spec, list) and any(isinstance(item, DataSource) for item in spec)


def source_paths(spec) -> list[str]:
    """The paths (or hub ids) data.train names, whichever way it is written."""
    items = [spec] if not isinstance(spec, list) else spec
    return [str(item.path if isinstance(item, DataSource) else item) for item in items]


@dataclass
class Source:
    """One entry of data.train, read and tokenized."""

    entry: DataSource
    format: str
    rows: int  # rows read (after max_rows), the held-out ones included
    examples: list[dict]
    examples_where: list[str]  # the row each example came from
    counts: TokenizeCounts
    held: list[dict] = field(default_factory=list)  # rows held out for validation (val_split)
    held_where: list[str] = field(default_factory=list)
    drawn: list[int] = field(default_factory=list)  # the examples one epoch of the mix draws from it

    @property
    def used(self) -> int:
        return len(self.drawn)

    def summary(self, total: int) -> dict:
        return {"source": self.entry.path, "weight": self.entry.weight, "format": self.format, "rows": self.rows,
                "examples": len(self.examples), "used": self.used, "share": self.used / total if total else 0.0}


@dataclass
class Mixed:
    """What prepare_data needs of a mix to report on it and train on it."""

    train: list[dict]
    validation: list[dict] | None
    counts: TokenizeCounts  # the sources' counts merged; tokens and lengths of the mix itself
    validation_counts: TokenizeCounts | None
    validation_from: str | None
    sources: list[Source]
    format: str  # "chat", or "chat+completion" when the sources differ
    format_detected: bool
    preview: list[tuple[dict, str]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.sources)

    @property
    def train_records(self) -> int:
        return sum(s.rows - len(s.held) for s in self.sources)


def prepare_mix(cfg, tokenizer, *, seed: int, validation_override=None) -> Mixed:
    """Read, hold out, tokenize and mix the entries of cfg.train (see the module docstring)."""
    weighted = all(isinstance(e, DataSource) and e.weight is not None for e in cfg.train)
    entries = [e if isinstance(e, DataSource) else DataSource(path=e) for e in cfg.train]
    val_spec = validation_override if validation_override is not None else cfg.validation
    sources = [_read_source(i, entry, cfg, tokenizer, seed=seed, hold_out=not val_spec)
               for i, entry in enumerate(entries)]

    if weighted:
        order = mix_order([len(s.examples) for s in sources], [s.entry.weight for s in sources],
                          seed=seed, stopping=cfg.mix_stopping)
    else:
        order = [(i, j) for i, s in enumerate(sources) for j in range(len(s.examples))]
    train = []
    for i, j in order:
        sources[i].drawn.append(j)
        train.append(sources[i].examples[j])
    preview = [(sources[i].examples[j], sources[i].examples_where[j]) for i, j in order[:PREVIEW_EXAMPLES]]

    formats = sorted({s.format for s in sources})
    validation = vcounts = val_from = None
    if val_spec:
        val_records, val_where = load_with_locations(val_spec)
        fmt = cfg.format if cfg.format != "auto" else detect_format(val_records[0], val_where[0])
        val_from = ", ".join(source_paths(val_spec))
        validation, vcounts = tokenize_records(val_records, dataclasses.replace(cfg, format=fmt), tokenizer,
                                               source=f"validation ({val_from})", where=val_where)
    elif cfg.val_split > 0:
        # Each source's rows were tokenized with its own format: tokenize the held-out ones the same way.
        validation, vcounts = [], TokenizeCounts(format="+".join(formats), rows=0, examples=0)
        for source in sources:
            ex, c = tokenize_records(source.held, dataclasses.replace(cfg, format=source.format), tokenizer,
                                     source=f"validation ({source.entry.path})", where=source.held_where)
            validation += ex
            _add_counts(vcounts, c)
        val_from = f"the training rows (val_split {cfg.val_split} of each source, seed {seed})"

    return Mixed(
        train=train, validation=validation, counts=_mix_counts(sources, train, tokenizer, "+".join(formats)),
        validation_counts=vcounts, validation_from=val_from, sources=sources, format="+".join(formats),
        format_detected=any((e.format or cfg.format) == "auto" for e in entries), preview=preview,
    )


def mix_order(sizes: list[int], weights: list[float], *, seed: int, stopping: str) -> list[tuple[int, int]]:
    """(source, example) pairs of one epoch of the mix: HF datasets' interleave_datasets over each
    source's example indices, shuffled with the seed (a different permutation per source)."""
    import datasets

    parts = [
        datasets.Dataset.from_dict({"source": [i] * n, "index": list(range(n))}).shuffle(seed=seed + i)
        for i, n in enumerate(sizes)
    ]
    total = sum(weights)
    mixed = datasets.interleave_datasets(
        parts, probabilities=[w / total for w in weights], seed=seed, stopping_strategy=stopping
    )
    return list(zip(mixed["source"], mixed["index"]))


# --------------------------------------------------------------------------- one source


def _read_source(i: int, entry: DataSource, cfg, tokenizer, *, seed: int, hold_out: bool) -> Source:
    """One entry read, its val_split held out, the rest tokenized."""
    records, where = load_source(entry.path, split=entry.split, name=f"data.train[{i}]")
    if entry.max_rows is not None:
        records, where = records[: entry.max_rows], where[: entry.max_rows]
    fmt = entry.format or cfg.format
    if fmt == "auto":
        fmt = detect_format(records[0], where[0])
    n = len(records)
    held_rows, held_where = [], []
    if hold_out and cfg.val_split > 0:
        k = max(1, round(n * cfg.val_split))
        if k >= n:
            raise DataError(
                f"data.val_split {cfg.val_split} would hold out {k} of the {plural(n, 'row')} of {entry.path}, "
                "leaving none of it to train on",
                "lower data.val_split, add rows (or raise its max_rows), or pass a validation file (data.validation)",
            )
        held = set(random.Random(seed + i).sample(range(n), k))
        held_rows = [r for j, r in enumerate(records) if j in held]
        held_where = [w for j, w in enumerate(where) if j in held]
        records = [r for j, r in enumerate(records) if j not in held]
        where = [w for j, w in enumerate(where) if j not in held]
    examples, counts = tokenize_records(records, dataclasses.replace(cfg, format=fmt), tokenizer,
                                        source=entry.path, where=where)
    skipped = set(counts.dropped_where) | set(counts.no_supervised_where)
    kept_where = [w for w in where if w not in skipped]
    return Source(entry=entry, format=fmt, rows=n, examples=examples, examples_where=kept_where, counts=counts,
                  held=held_rows, held_where=held_where)


def _add_counts(total: TokenizeCounts, part: TokenizeCounts) -> None:
    """Add what tokenizing one set of rows did to `total` (rows, cuts, lengths, tokens)."""
    total.rows += part.rows
    total.examples += part.examples
    for name in ("truncated", "dropped", "dropped_no_supervised", "tokens", "supervised_tokens", "eos_last"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.longest = max(total.longest, part.longest)
    for name in ("raw_lengths", "lengths", "truncated_where", "dropped_where", "no_supervised_where"):
        getattr(total, name).extend(getattr(part, name))


def _mix_counts(sources: list[Source], train: list[dict], tokenizer, fmt: str) -> TokenizeCounts:
    """The sources' counts of rows read and cut, with the tokens, lengths and EOS of the mix
    itself (what training sees: a repeated example counts each time, a left-out one not at all)."""
    counts = TokenizeCounts(format=fmt, rows=0, examples=0)
    for source in sources:
        _add_counts(counts, source.counts)
    eos = eos_id(tokenizer)
    counts.examples = len(train)
    counts.lengths = [len(ex["input_ids"]) for ex in train]
    counts.tokens = sum(counts.lengths)
    counts.supervised_tokens = sum(supervised_count(ex["labels"]) for ex in train)
    counts.eos_last = sum(eos in ex["labels"][1:] for ex in train)
    truncated = [set(s.counts.truncated_where) for s in sources]
    counts.truncated_examples = sum(
        s.examples_where[j] in truncated[i] for i, s in enumerate(sources) for j in s.drawn
    )
    return counts
