"""Show base and adapter answers side by side on held-out prompts (the quickstart's last step).

    python scripts/quickstart_compare.py runs/quickstart data/devils-dictionary/test.jsonl --n 4

Greedy decoding, so the output is repeatable; the words come from the held-out split that
training never saw.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("held_out", type=Path, help="chat JSONL; the first user turn of each row is the prompt")
    parser.add_argument("--n", type=int, default=4, help="how many prompts")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from lora_cli.console import quiet_libraries
    from lora_cli.inference.generation import encode_prompt, generate_ids, generation_config, load_generator

    quiet_libraries()
    rows = [json.loads(line) for line in args.held_out.read_text(encoding="utf-8").splitlines() if line.strip()]
    gen = load_generator(args.run, None)
    config = generation_config(gen, max_new_tokens=args.max_new_tokens, temperature=0.0, top_p=1.0, top_k=0)
    table = Table(title=f"held-out prompts: base vs adapter ({args.run})", show_lines=True)
    for column in ("prompt", "base model", "with the adapter", "Bierce (reference)"):
        table.add_column(column, overflow="fold")
    for row in rows[: args.n]:
        prompt = row["messages"][0]["content"]
        ids = encode_prompt(gen.tokenizer, prompt, chat=True, system_prompt=gen.system_prompt)
        answers = [
            gen.tokenizer.decode(
                generate_ids(gen, ids, config, adapter=adapter, seed=0), skip_special_tokens=True
            ).strip()
            for adapter in (False, True)
        ]
        table.add_row(prompt, *answers, row["messages"][1]["content"])
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
