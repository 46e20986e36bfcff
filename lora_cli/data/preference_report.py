"""The data report for preference pairs, and their preview.

`PreferenceReport` answers to what `lora train`, `lora validate`, run.json and the model card read
of a data report (format, rows, train_rows, tokens, validation, fingerprint, lines()), plus
what pairs have of their own: prompt / chosen / rejected token lengths, and which rows were cut.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rich.console import Console

from lora_cli.console import plural
from lora_cli.data import stats
from lora_cli.data.preview import preview_text
from lora_cli.data.report import MAX_LISTED
from lora_cli.data.tokenize import IGNORE_INDEX


@dataclass
class PairCounts:
    """What `tokenize_pairs` did to one set of rows."""

    format: str  # preference | preference-chat
    rows: int
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0  # what the model reads: the prompt twice, both answers
    answer_tokens: int = 0  # chosen + rejected: what the log-probabilities are summed over
    longest: int = 0  # prompt + the longer answer, before truncation
    prompt_lengths: list[int] = dataclasses.field(default_factory=list)
    chosen_lengths: list[int] = dataclasses.field(default_factory=list)
    rejected_lengths: list[int] = dataclasses.field(default_factory=list)
    truncated_where: list[str] = dataclasses.field(default_factory=list)
    dropped_where: list[str] = dataclasses.field(default_factory=list)


@dataclass
class PreferenceReport:
    format: str  # preference (plain strings) | preference-chat (messages)
    format_detected: bool
    method: str  # dpo | orpo
    sources: list[str]
    rows: int
    train_records: int
    train_rows: int  # pairs kept for training
    validation_rows: int
    validation_from: str | None
    max_length: int
    too_long: str
    truncated: int
    dropped: int
    train_tokens: int
    supervised_tokens: int  # answer tokens (chosen + rejected)
    longest: int
    packed_rows: int | None = None  # pairs are never packed (the model card reads it)
    validation_truncated: int = 0
    validation_dropped: int = 0
    fingerprint: str = ""
    # min / median / p95 / max token lengths of the training pairs' parts, before truncation
    prompt_lengths: dict = dataclasses.field(default_factory=dict)
    chosen_lengths: dict = dataclasses.field(default_factory=dict)
    rejected_lengths: dict = dataclasses.field(default_factory=dict)
    truncated_rows: list[str] = dataclasses.field(default_factory=list)
    dropped_rows: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def lines(self, full: bool = False) -> list[str]:
        kind = "chat messages" if self.format == "preference-chat" else "plain text"
        detected = " (auto-detected)" if self.format_detected else ""
        out = [
            f"data: {plural(self.rows, 'row')} from {', '.join(self.sources)}, format preference "
            f"({kind}){detected}, for train.method: {self.method}",
            f"train: {plural(self.train_rows, 'pair')}, {plural(self.train_tokens, 'token')} read "
            f"({self.supervised_tokens} in answers), longest {self.longest} (prompt + the longer answer)",
        ]
        if self.validation_from:
            out.append(f"validation: {plural(self.validation_rows, 'pair')} from {self.validation_from}")
        else:
            out.append("validation: none (set data.validation or data.val_split)")
        for name in ("prompt", "chosen", "rejected"):
            st = getattr(self, f"{name}_lengths")
            if st:
                out.append(f"{name + ' lengths':<17} (tokens): min {st['min']}, median {st['median']}, "
                           f"p95 {st['p95']}, max {st['max']}")
        if self.truncated:
            out.append(f"truncated {self.truncated} of {plural(self.train_records, 'pair')} to max_length "
                       f"{self.max_length} (both answers cut after the prompt; data.too_long: truncate)")
        if self.dropped:
            out.append(f"dropped {self.dropped} of {plural(self.train_records, 'pair')} (longer than max_length "
                       f"{self.max_length})")
        if self.validation_truncated or self.validation_dropped:
            out.append(f"validation: truncated {self.validation_truncated}, dropped "
                       f"{plural(self.validation_dropped, 'pair')}")
        for label, rows, count in (("truncated", self.truncated_rows, self.truncated),
                                   ("dropped", self.dropped_rows, self.dropped)):
            if rows and (full or count <= 3):
                more = f" (+{count - len(rows)} more)" if count > len(rows) else ""
                out.append(f"{label}: {'; '.join(rows)}{more}")
        return out + self.notes + [f"warning: {w}" for w in self.warnings]


def add_pair_details(report: PreferenceReport, counts: PairCounts) -> None:
    report.prompt_lengths = stats.summary(counts.prompt_lengths)
    report.chosen_lengths = stats.summary(counts.chosen_lengths)
    report.rejected_lengths = stats.summary(counts.rejected_lengths)
    report.truncated_rows = counts.truncated_where[:MAX_LISTED]
    report.dropped_rows = counts.dropped_where[:MAX_LISTED]
    if counts.truncated and report.truncated == report.train_records:
        report.warnings.append(
            "every pair was truncated: the answers' endings (and their EOS) are never seen. Fix: raise "
            "data.max_length"
        )


def pair_preview_lines(pair: dict, tokenizer, *, color: bool) -> list[str]:
    """The pair as the loss sees it: the prompt masked (no log-probability of it counts), then
    each answer, whose tokens are scored."""
    prompt = pair["prompt_ids"]
    lines = []
    for name in ("chosen", "rejected"):
        answer = pair[f"{name}_ids"]
        example = {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}
        lines.append(f"{name}: " + preview_text(example, tokenizer, color=color))
    return lines


def print_pair_preview(pairs: list[dict], where: list[str], tokenizer) -> None:
    console = Console(highlight=False, soft_wrap=True)
    color = console.is_terminal
    legend = ("[bold green]scored[/], [dim]masked (the prompt)[/]" if color
              else "scored answer text plain, the masked prompt in [masked]...[/]")
    if not pairs:
        print("preview: the first rows have nothing to score within max_length (the report above says why)")
        return
    print(f"preview of {plural(len(pairs), 'pair')}: ", end="", flush=True)
    console.print(legend, markup=color)
    for pair, w in zip(pairs, where):
        print(f"--- {w}: prompt {len(pair['prompt_ids'])} tokens, chosen {len(pair['chosen_ids'])}, "
              f"rejected {len(pair['rejected_ids'])}", flush=True)
        for line in pair_preview_lines(pair, tokenizer, color=color):
            console.print(line, markup=color)
