"""One module per command (`lora <verb>`), each with a `run(...)` that reads top to bottom; commands
never import each other: what two of them share lives in a layer below (docs/architecture.md)."""
