"""Getting a model out of `lora`: merging a run (merge.py) and writing GGUF files for llama.cpp and
Ollama (architectures, vocab, quant types, the writers, the checks, the Modelfile)."""
