#!/usr/bin/env python3
"""Turn The Devil's Dictionary (Ambrose Bierce, 1911) into chat-format JSONL for SFT.

Input: one JSON object per line, {"headword": "abasement", "entry": "ABASEMENT, n.  A ..."},
as exported from the dictd files of the Debian package dict-devil 1.0-13.1.

Output: <out>/train.jsonl and <out>/test.jsonl, one object per line:

    {"messages": [{"role": "user", "content": "Define: Abasement"},
                  {"role": "assistant", "content": "n. A decent and customary ..."}]}

Rules (see data/README.md):
  * Prose definition = the lines from the start of the entry up to the first blank line or the
    first line that begins with whitespace.  In the source every verse quotation, indented
    quotation and follow-on anecdote paragraph starts that way, so this keeps the definition
    and drops the verse.  Whitespace runs are collapsed to single spaces.
  * The leading "HEADWORD, " is removed; the part of speech ("n.", "v.t.", ...) is kept.  The
    single-letter entries (I, J, K, T, W, X) read as sentences about the letter and are kept whole.
  * If the prose ends in a lead-in to the dropped quotation ("... the following lines:",
    "The poet assures us that --"), that unfinished last sentence is removed.
  * dictd cross-reference braces are removed ("{LOGIC}" -> "LOGIC").
  * Skipped: empty definitions (part of speech only: the definition is in verse, or the prose is
    only a lead-in to the verse), pure cross-references ("See {HUSBAND}."), exact duplicates, and
    definitions over --max-chars.
  * Split: random.Random(1911).shuffle, first --test-size rows -> test.jsonl, rest -> train.jsonl.

Standard library only; rerunning produces byte-identical files.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT / "data" / "sources" / "devils-dictionary.jsonl"
DEFAULT_OUT = REPO_ROOT / "data" / "devils-dictionary"

SEED = 1911

# Parts of speech used in the source, longest first so "v.t." wins over "v.".
POS = r"(?:adj\. and n\.|n\.pl\.|v\.t\.|v\.i\.|p\.p\.|pron\.|pro\.|adj\.|adv\.|pp\.|v\.|n\.|x\.)"
# Headword: capitals, digits and a little punctuation, plus the lowercase word "or"
# ("BABE or BABY", "TZETZE (or TSETSE) FLY", "CONFIDANT, CONFIDANTE").
HW = r"[A-Z](?:[A-Z0-9'.\-(), ]|\bor\b)*?"
# "ABASEMENT, n.  ...", "INFERIAE,n.  ...", "IMPOSTOR n.  ..."
RE_POS_HEAD = re.compile(rf"^(?P<hw>{HW})(?:,\s*|\s+)(?P<pos>{POS})(?=\s|$)")
# "HABEAS CORPUS.  A writ ...", "CUI BONO?  [Latin] ...", "LL.D.  Letters ...", "ABRACADABRA."
RE_BARE_HEAD = re.compile(rf"^(?P<hw>{HW})(?P<end>[.?]?)(?:\s{{2,}}|$)")
# "I is the first letter ...", "T, the twentieth letter ...", "W (double U) has ..."
RE_LETTER_HEAD = re.compile(r"^(?P<hw>[A-Z])(?=[ ,])")

# Headwords whose natural spelling has capitals beyond the first letter.
HEADWORD_OVERRIDES = {
    "LL.D.": "LL.D.",
    "R.I.P.": "R.I.P.",
    "UN-AMERICAN": "Un-American",
    "WALL STREET": "Wall Street",
}

# Entries left out because they use racial slurs or ethnic/religious stereotypes: a model
# fine-tuned in our quickstart would learn to repeat them. (Matched on the natural headword.)
EXCLUDED_HEADWORDS = {"African", "Minstrel", "Negro", "Pickaninny", "Mulatto", "Hebrew", "Aboriginies"}

RE_XREF = re.compile(r"^(?:See|The same as|Same as)\b[^.]*\.$")
RE_TERMINAL = re.compile(r"[.!?][\"')_]*$")
# A sentence boundary: end punctuation, optional closers, space, then a capital (maybe quoted).
RE_SENT_END = re.compile(r"[.!?][\"')_]*\s+(?=[\"'(_]*[A-Z])")
RE_ABBREV = re.compile(r"(?:^|\s)(?:[A-Z][a-z]{0,2}|[A-Z](?:\.[A-Z])*)\.$")


def natural_headword(raw: str) -> str:
    """'BERENICE'S HAIR' -> "Berenice's hair"; 'LL.D.' -> 'LL.D.'."""
    raw = " ".join(raw.split())
    if raw in HEADWORD_OVERRIDES:
        return HEADWORD_OVERRIDES[raw]
    low = raw.lower()
    return low[:1].upper() + low[1:]


def prose_block(entry: str) -> str:
    """Lines from the start up to the first blank or indented line, whitespace collapsed."""
    kept = []
    for line in entry.split("\n"):
        if not line.strip() or line[:1].isspace():
            break
        kept.append(line)
    return " ".join(" ".join(kept).split())


def trim_lead_in(body: str) -> str:
    """Drop an unfinished last sentence that introduced a (dropped) quotation."""
    if RE_TERMINAL.search(body):
        return body
    cut = 0
    for m in RE_SENT_END.finditer(body):
        head = body[: m.start() + 1]
        if RE_ABBREV.search(head):  # "Dr. Jamrach", "St. Francis": not a sentence end
            continue
        cut = m.start() + len(m.group(0).rstrip())
    return body[:cut].rstrip()


def parse(entry: str) -> tuple[str | None, str | None, str]:
    """Return (headword, definition, status); status is 'ok' or a skip reason."""
    text = prose_block(entry)
    # Match the header on the raw first line: the double space after "HABEAS CORPUS." matters.
    first = entry.split("\n", 1)[0]
    m = RE_POS_HEAD.match(first)
    if m:
        hw = natural_headword(m.group("hw"))
        pos = m.group("pos")
        rest = text[len(" ".join(first[: m.end()].split())) :].strip()
        body = rest
        lead = pos
    else:
        m = RE_BARE_HEAD.match(first)
        if m and m.group("hw").strip():
            raw = m.group("hw")
            if m.group("end") == "?" or (m.group("end") == "." and "." in raw):
                raw += m.group("end")  # "CUI BONO?", "LL.D.", "R.I.P."
            hw = natural_headword(raw)
            body = text[len(" ".join(first[: m.end()].split())) :].strip()
            lead = ""
        else:
            m = RE_LETTER_HEAD.match(first)
            if not m:
                return None, None, "unparsed header"
            hw = m.group("hw")
            body = text  # "I is the first letter of the alphabet, ..."
            lead = ""
    if not body:
        return hw, None, "empty definition (verse only)"
    if RE_XREF.match(body):
        return hw, None, "cross-reference only"
    body = trim_lead_in(body)
    if not body:
        return hw, None, "definition is only a lead-in to verse"
    body = body.replace("{", "").replace("}", "")
    definition = f"{lead} {body}" if lead else body
    return hw, definition, "ok"


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help="input JSONL (default: data/sources/devils-dictionary.jsonl in the repo)",
    )
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output directory (default: data/devils-dictionary in the repo)"
    )
    ap.add_argument(
        "--max-chars", type=int, default=400, help="drop examples whose assistant text is longer (default: 400)"
    )
    ap.add_argument("--test-size", type=int, default=60, help="rows held out (default: 60)")
    args = ap.parse_args(argv)

    if not args.source.is_file():
        print(f"error: source not found: {args.source}", file=sys.stderr)
        return 2

    with args.source.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]

    dropped: collections.Counter[str] = collections.Counter()
    examples: list[dict] = []
    seen: set[tuple[str, str]] = set()
    for rec in records:
        hw, definition, status = parse(rec["entry"])
        if status != "ok":
            dropped[status] += 1
            continue
        if hw in EXCLUDED_HEADWORDS:
            dropped["excluded (slurs / stereotypes)"] += 1
            continue
        key = (hw, definition)
        if key in seen:
            dropped["duplicate entry"] += 1
            continue
        seen.add(key)
        if len(definition) > args.max_chars:
            dropped[f"longer than {args.max_chars} chars"] += 1
            continue
        examples.append(
            {
                "messages": [
                    {"role": "user", "content": f"Define: {hw}"},
                    {"role": "assistant", "content": definition},
                ]
            }
        )

    if len(examples) <= args.test_size:
        print(f"error: only {len(examples)} examples, need more than {args.test_size}", file=sys.stderr)
        return 1

    random.Random(SEED).shuffle(examples)
    test, train = examples[: args.test_size], examples[args.test_size :]
    write_jsonl_atomic(args.out / "train.jsonl", train)
    write_jsonl_atomic(args.out / "test.jsonl", test)

    lengths = [len(ex["messages"][1]["content"]) for ex in examples]
    print(f"source entries: {len(records)}")
    print(f"kept:           {len(examples)}")
    print(f"dropped:        {sum(dropped.values())}")
    for reason, n in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {n:4d}  {reason}")
    print(f"assistant chars: median {statistics.median(lengths):g}, max {max(lengths)}, min {min(lengths)}")
    print(f"wrote {len(train)} rows -> {args.out / 'train.jsonl'}")
    print(f"wrote {len(test)} rows -> {args.out / 'test.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
