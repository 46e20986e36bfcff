"""The data report: what tokenizing did to the rows, before any training.

`TokenizeCounts` is filled while rows are tokenized (data/tokenize.py); `DataReport` is what
`lora validate` and `lora train` print and what run.json keeps: rows per split, token lengths,
which rows were truncated or dropped, the supervised share, EOS, padding, and warnings with fixes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lora_cli.console import plural
from lora_cli.data import stats

MAX_LISTED = 10  # truncated / dropped rows named in the data report; the rest are only counted


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
    truncated_examples: int | None = None  # a mix (data/mixing.py): truncated examples among those trained on


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
    # [[low, high, count], ...] bins (stats.histogram).
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
    # A weighted mix (data/mixing.py): per source {source, weight, format, rows, examples, used,
    # share}, and what one epoch of it is (data.mix_stopping; None: every row of each source once).
    mix: list[dict] = dataclasses.field(default_factory=list)
    mix_stopping: str | None = None
    mix_seed: int | None = None

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
            out += stats.histogram_lines(self.length_histogram, self.max_length)
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
                f"{plural(self.train_rows, 'example')}" + (pad_note if self.pad_is_eos and full else "")
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
        out = [f"data: {plural(self.rows, 'row')} from {', '.join(self.sources)}, format {self.format}{detected}"]
        out += self._mix_lines()
        share = self.supervised_tokens / self.train_tokens if self.train_tokens else 0.0
        out.append(
            f"train: {plural(self.train_rows, 'example')}, {plural(self.train_tokens, 'token')} "
            f"({self.supervised_tokens} supervised, {share:.0%}), longest {self.longest}"
        )
        if self.validation_from:
            out.append(f"validation: {plural(self.validation_rows, 'example')} from {self.validation_from}")
        else:
            out.append("validation: none (set data.validation or data.val_split)")
        train_records = self.train_records
        if self.truncated:
            out.append(
                f"truncated {self.truncated} of {plural(train_records, 'row')} to max_length "
                f"{self.max_length} (data.too_long: truncate)"
            )
        if self.dropped:
            out.append(
                f"dropped {self.dropped} of {plural(train_records, 'row')} longer than max_length "
                f"{self.max_length} (data.too_long: drop)"
            )
        if self.dropped_no_supervised:
            out.append(
                f"dropped {self.dropped_no_supervised} of {plural(train_records, 'row')} with no supervised "
                "tokens" + (" after truncation" if self.truncated else "")
            )
        if self.validation_truncated or self.validation_dropped:
            out.append(
                f"validation: truncated {self.validation_truncated}, dropped {plural(self.validation_dropped, 'row')}"
            )
        if self.packed_rows is not None:
            out.append(
                f"packed {plural(self.train_rows, 'example')} into {plural(self.packed_rows, 'row')} of at most "
                f"{self.max_length} tokens ({1 - (self.padding_fraction or 0):.1%} full)"
            )
        return out + self.notes


    def _mix_lines(self) -> list[str]:
        """Each source's rows and share of the training examples (data.train entries)."""
        if not self.mix:
            return []
        used = sum(s["used"] for s in self.mix)
        if self.mix_stopping is None:
            out = [f"sources: every example of each, once ({plural(used, 'example')})"]
        else:
            until = {"first_exhausted": "until the first source runs out, no example repeated",
                     "all_exhausted": "until every source is used whole, smaller ones repeated"}[self.mix_stopping]
            out = [f"mix by weight: {plural(used, 'example')} per epoch, {until} (data.mix_stopping: "
                   f"{self.mix_stopping}, seed {self.mix_seed})"]
        for s in self.mix:
            weight = f"weight {s['weight']:g}, " if s["weight"] is not None else ""
            out.append(f"  {s['source']}: {weight}{plural(s['rows'], 'row')} -> {plural(s['examples'], 'example')}, "
                       f"{s['used']} in the mix ({s['share']:.1%})")
        return out


def add_details(report: DataReport, counts: TokenizeCounts, tokenizer, *, seed: int, batch_size: int | None) -> None:
    """Length distribution, which rows were cut, and whether examples teach the model to stop."""
    report.length_stats = stats.summary(counts.raw_lengths)
    report.length_histogram = stats.histogram(counts.raw_lengths, report.max_length)
    report.truncated_rows = counts.truncated_where[:MAX_LISTED]
    report.dropped_rows = counts.dropped_where[:MAX_LISTED]
    report.no_supervised_rows = counts.no_supervised_where[:MAX_LISTED]
    report.eos_token = str(tokenizer.eos_token)
    report.eos_supervised = counts.eos_last
    report.pad_is_eos = tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
    # Truncated examples lose their EOS by design (the report lists them); any other example
    # without a supervised EOS teaches the model never to stop.
    truncated = counts.truncated if counts.truncated_examples is None else counts.truncated_examples
    missing = report.train_rows - counts.eos_last - truncated
    if missing > 0:
        # (not a certain cause: a conversation that ends with a user turn has no answer to end either)
        cause = (" (the pad token is EOS here: check that nothing masked it like padding)" if report.pad_is_eos else "")
        report.warnings.append(
            f"{missing} of {plural(report.train_rows, 'example')} have no supervised "
            f"EOS {report.eos_token!r}{cause}: the model will not learn to stop. Fix: make sure answers "
            "end with the EOS token (for chat data, the template's end-of-turn token must be the "
            "tokenizer's eos_token), or set data.train_on_prompt / check the data format"
        )
