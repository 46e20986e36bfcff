"""Build the tiny random GPT-2 and Llama models that configs/tiny-*.yaml train (CI-sized smoke runs).

    python scripts/make_tiny_models.py build/tiny-models   ->  build/tiny-models/{gpt2,llama}/

Both get a ChatML chat template so they can train on chat data such as data/devils-dictionary.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.tiny import build_tiny_model  # noqa: E402  (one builder for tests and scripts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", default=Path("build/tiny-models"))
    args = parser.parse_args()
    for arch in ("gpt2", "llama"):
        path = build_tiny_model(args.out / arch, arch, chat_template=True)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
