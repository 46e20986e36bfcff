"""`python -m lora_cli` runs the CLI (also what `accelerate launch -m lora_cli` uses)."""

from lora_cli.cli import entry

if __name__ == "__main__":
    entry()
