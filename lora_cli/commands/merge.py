"""`lora merge`: fold a run's adapter into its base and save a plain transformers model.

The work (and its checks) lives in export/merge.py, which `lora export` shares.
"""

from __future__ import annotations

from lora_cli.export.merge import MergeResult, merge_run

run = merge_run  # the command's `run(run, *, dtype, output, onto, overwrite) -> MergeResult`

__all__ = ["MergeResult", "run"]
