"""Training around the HF Trainer: its arguments, the Trainer subclass, the loss, callbacks,
checkpoints, resume, many processes, and memory (estimated before, measured after)."""
