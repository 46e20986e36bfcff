"""Models: where one comes from (sources.py, gguf_cache.py), its config (facts.py), its dtypes
(dtypes.py), loading it (loading.py), LoRA on it (adapters.py, lean_dropout.py), and folding an
adapter into it (merging.py)."""
