"""Training data: files -> rows (records.py) -> formats (formats.py) -> tokens + labels, prompt
masked (tokenize.py) -> packed rows and padded batches (packing.py) -> the train/validation split
and its report (prepare.py, report.py, stats.py); preview.py shows examples as the loss sees them."""
