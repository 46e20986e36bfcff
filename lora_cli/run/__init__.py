"""The run directory: its layout (paths.py), run.json (record.py), opening and guarding it
(lifecycle.py, processes.py), finding runs (lookup.py), what they hold (checkpoints.py, merged.py),
and the recipe a run trained with (recipes.py)."""
