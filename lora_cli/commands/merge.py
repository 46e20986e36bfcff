"""`lora merge`: fold a run's adapter into its base and save a plain transformers model.

The work (and its checks) lives in export/merge.py, which `lora export` shares.
"""

from __future__ import annotations

from pathlib import Path

from lora_cli.export.merge import MergeResult, merge_run


def run(
    run: str | Path | None,
    *,
    dtype: str | None = None,
    output: str | Path | None = None,
    onto: str | None = None,
    overwrite: bool = False,
) -> MergeResult:
    """Merge the run's adapter into its base, verify, and save under `output` (default RUN/merged)."""
    return merge_run(run, dtype=dtype, output=output, onto=onto, overwrite=overwrite)
