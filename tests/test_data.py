"""lora_cli/data/: loading, formats, label masking, too_long, splits, packing, collation, bad input.

Real tiny tokenizers and models from conftest; no mocks. The packing test runs the tiny models
the way training does (sdpa, use_cache=False, no attention_mask) and compares per-example losses.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lora_cli.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from lora_cli.data.packing import Collator, pack
from lora_cli.data.prepare import prepare_data
from lora_cli.data.records import load_records
from lora_cli.data.tokenize import IGNORE_INDEX, tokenize_records
from lora_cli.errors import DataError
from lora_cli.recipe.schema import DataConfig

CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "one two three"},
        {"role": "user", "content": "what is the capital of france?"},
        {"role": "assistant", "content": "paris"},
    ]
}


def supervised(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def masked(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX])


def tokenize(records, tokenizer, **cfg):
    return tokenize_records(records, DataConfig(**cfg), tokenizer, source="test")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- formats and masking


def test_text_is_all_supervised_and_ends_with_eos(gpt2_tokenizer):
    (ex,), counts = tokenize([{"text": "the quick brown fox"}], gpt2_tokenizer)
    assert counts.format == "text"
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"][-1] == gpt2_tokenizer.eos_token_id
    assert supervised(gpt2_tokenizer, ex) == "the quick brown fox<|endoftext|>"


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_completion_masks_the_prompt(gpt2_tokenizer, train_on_prompt):
    row = {"prompt": "question: what is the capital of france? answer:", "completion": " paris"}
    (ex,), _ = tokenize([row], gpt2_tokenizer, train_on_prompt=train_on_prompt)
    n_prompt = len(gpt2_tokenizer(row["prompt"])["input_ids"])
    eos = gpt2_tokenizer.eos_token_id
    assert ex["input_ids"][-1] == eos and ex["labels"][-1] == eos
    if train_on_prompt:
        assert ex["labels"] == ex["input_ids"]
    else:
        assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert IGNORE_INDEX not in ex["labels"][n_prompt:]
        assert supervised(gpt2_tokenizer, ex) == " paris<|endoftext|>"
        assert masked(gpt2_tokenizer, ex) == row["prompt"]


def test_a_tokenizer_that_adds_bos_and_eos_itself():
    from tokenizers.processors import TemplateProcessing

    from tests.tiny import train_tokenizer

    tok = train_tokenizer()
    tok.bos_token, tok.eos_token = "<|im_start|>", "<|im_end|>"
    bos, eos = tok.bos_token_id, tok.eos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A <|im_end|>", special_tokens=[("<|im_start|>", bos), ("<|im_end|>", eos)]
    )
    assert tok("one")["input_ids"][0] == bos and tok("one")["input_ids"][-1] == eos
    (text,), _ = tokenize([{"text": "one two"}], tok)
    assert text["input_ids"] == tok("one two")["input_ids"]  # BOS kept, a single EOS
    (comp,), _ = tokenize([{"prompt": "one", "completion": " two"}], tok)
    assert comp["input_ids"][0] == bos and comp["input_ids"].count(eos) == 1
    assert masked(tok, comp) == "<|im_start|>one"
    assert supervised(tok, comp) == " two<|im_end|>"


@pytest.mark.parametrize("inp", ["", "abc xyz", None])
def test_alpaca_uses_the_stanford_template(llama_tokenizer, inp):
    row = {"instruction": "count to three", "output": "one two three"}
    if inp is not None:
        row["input"] = inp
    (ex,), counts = tokenize([row], llama_tokenizer)
    assert counts.format == "alpaca"
    template = ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT
    assert masked(llama_tokenizer, ex) == template.format(instruction="count to three", input=inp)
    assert ("### Input:\nabc xyz" in masked(llama_tokenizer, ex)) == bool(inp)
    assert supervised(llama_tokenizer, ex) == "one two three<|im_end|>"


def test_chat_supervises_exactly_the_assistant_turns(llama_tokenizer):
    (ex,), _ = tokenize([CHAT], llama_tokenizer)
    text = llama_tokenizer.decode(ex["input_ids"])
    assert text == llama_tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    # Each assistant turn with the template's end-of-turn (<|im_end|> = EOS, then the newline).
    assert supervised(llama_tokenizer, ex) == "one two three<|im_end|>\nparis<|im_end|>\n"
    runs = [label != IGNORE_INDEX for label in ex["labels"]]
    assert sum(1 for i, s in enumerate(runs) if s and (i == 0 or not runs[i - 1])) == 2  # two stretches
    prompt = masked(llama_tokenizer, ex)
    for m in CHAT["messages"]:
        if m["role"] != "assistant":
            assert m["content"] in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # No extra EOS: the render already ends with it (before the trailing newline).
    assert ex["input_ids"].count(llama_tokenizer.eos_token_id) == 5


def test_chat_train_on_prompt_supervises_everything(llama_tokenizer):
    (ex,), _ = tokenize([CHAT], llama_tokenizer, train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]


def test_chat_system_prompt_is_added_only_when_missing(llama_tokenizer):
    no_system = {"messages": CHAT["messages"][1:]}
    (ex, ex2), _ = tokenize([no_system, CHAT], llama_tokenizer, system_prompt="you are a fox")
    assert llama_tokenizer.decode(ex["input_ids"]).startswith("<|im_start|>system\nyou are a fox<|im_end|>")
    assert "you are a fox" not in llama_tokenizer.decode(ex2["input_ids"])
    assert supervised(llama_tokenizer, ex) == "one two three<|im_end|>\nparis<|im_end|>\n"


def test_chat_appends_a_supervised_eos_when_the_template_has_none(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    (ex,), _ = tokenize([CHAT], tok)
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id
    assert supervised(tok, ex) == "one two three\nparis\n<|im_end|>"


def test_chat_edge_conversations(llama_tokenizer):
    rows = [
        # ShareGPT spelling; the assistant speaks first; non-ASCII content (offsets are characters).
        {"conversations": [{"from": "gpt", "value": "café 🦊 ok"}, {"from": "human", "value": "merci"},
                           {"from": "gpt", "value": "de rien"}]},
        # Ends with a user turn: nothing after the last assistant turn is learned, no EOS added.
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                      {"role": "tool", "content": "42"}]},
        # An assistant turn that only calls a tool (content null) is fine.
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
                      {"role": "assistant", "content": "done"}]},
        # No assistant turn at all: nothing to learn, dropped and counted.
        {"messages": [{"role": "user", "content": "hi"}]},
    ]
    (a, b, c), counts = tokenize(rows, llama_tokenizer)
    assert counts.format == "chat" and counts.dropped_no_supervised == 1
    assert supervised(llama_tokenizer, a) == "café 🦊 ok<|im_end|>\nde rien<|im_end|>\n"
    assert masked(llama_tokenizer, a).startswith("<|im_start|>assistant\n")
    assert supervised(llama_tokenizer, b) == "yo<|im_end|>\n"
    assert llama_tokenizer.decode(b["input_ids"]).endswith("<|im_start|>tool\n42<|im_end|>\n")
    assert supervised(llama_tokenizer, c) == "<|im_end|>\ndone<|im_end|>\n"


@pytest.mark.parametrize(
    "row, fmt",
    [
        (CHAT, "chat"),
        ({"instruction": "a", "input": "", "output": "b", "text": "x"}, "alpaca"),
        ({"prompt": "a", "completion": "b", "id": 3}, "completion"),
        ({"text": "hello world", "meta": 1}, "text"),
    ],
)
def test_auto_detects_each_format(llama_tokenizer, row, fmt):
    _, counts = tokenize([row], llama_tokenizer)
    assert counts.format == fmt


# --------------------------------------------------------------------------- files


ROWS = [{"prompt": "one, two", "completion": ' three "four"\nfive'}, {"prompt": "a", "completion": "b"}]


def _write(tmp_path, kind):
    if kind == "jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text("\n" + json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]))  # blank lines, no final newline
    elif kind == "json-list":
        (p := tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2))
    elif kind == "json-data":
        (p := tmp_path / "d.json").write_text(json.dumps({"data": ROWS}))
    elif kind == "json-train":
        (p := tmp_path / "d.json").write_text(json.dumps({"train": ROWS, "version": 1}))
    elif kind in ("csv", "tsv"):
        import csv

        p = tmp_path / f"d.{kind}"
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, ["prompt", "completion"], delimiter="," if kind == "csv" else "\t")
            w.writeheader()
            w.writerows(ROWS)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), p := tmp_path / "d.parquet")
    return p


@pytest.mark.parametrize("kind", ["jsonl", "json-list", "json-data", "json-train", "csv", "tsv", "parquet"])
def test_every_file_type_loads(tmp_path, kind):
    assert load_records(str(_write(tmp_path, kind))) == ROWS


def test_txt_is_one_record_per_paragraph(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes(b"\xef\xbb\xbffirst line\nsecond line\n\n\n   \nthird\r\n\r\nfourth\n")
    assert load_records(str(p)) == [{"text": "first line\nsecond line"}, {"text": "third"}, {"text": "fourth"}]


def test_csv_quirks(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_bytes(b"\xef\xbb\xbf prompt ,completion,,\r\nhi,yo,,\r\n\r\n\"a,b\",\"line1\r\nline2\",,\r\n")
    assert load_records(str(p)) == [{"prompt": "hi", "completion": "yo"},
                                    {"prompt": "a,b", "completion": "line1\r\nline2"}]


def test_chat_messages_in_csv_and_parquet(tmp_path, llama_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Parquet fills absent struct keys with null; CSV holds the messages as JSON text.
    messages = [dict(m, name=None) for m in CHAT["messages"]]
    pq.write_table(pa.Table.from_pylist([{"messages": messages}]), pq_path := tmp_path / "c.parquet")
    csv_path = tmp_path / "c.csv"
    csv_path.write_text('messages\n"' + json.dumps(CHAT["messages"]).replace('"', '""') + '"\n')
    for path in (pq_path, csv_path):
        (ex,), counts = tokenize(load_records(str(path)), llama_tokenizer)
        assert counts.format == "chat"
        assert supervised(llama_tokenizer, ex) == "one two three<|im_end|>\nparis<|im_end|>\n"


def test_a_list_of_files_is_concatenated(tmp_path, gpt2_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    b = tmp_path / "b.txt"
    b.write_text("three\n\nfour\n")
    cfg = DataConfig(train=[str(a), str(b)])
    assert [r["text"] for r in load_records(cfg.train)] == ["one", "two", "three", "four"]
    data = prepare_data(cfg, gpt2_tokenizer, seed=0)
    assert data.report.rows == 4 and data.report.train_rows == 4
    assert [supervised(gpt2_tokenizer, e) for e in data.train] == [
        f"{w}<|endoftext|>" for w in ("one", "two", "three", "four")
    ]


# --------------------------------------------------------------------------- too_long


LENGTHS_ROWS = [{"text": " ".join(["one"] * n)} for n in (3, 30, 5, 40)]


def test_too_long_truncate(gpt2_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", LENGTHS_ROWS)
    data = prepare_data(DataConfig(train=str(path), max_length=16, too_long="truncate"), gpt2_tokenizer, seed=0)
    r = data.report
    assert (r.rows, r.train_rows, r.truncated, r.dropped, r.dropped_no_supervised) == (4, 4, 2, 0, 0)
    assert max(len(e["input_ids"]) for e in data.train) == 16
    assert r.longest > 16
    assert "truncated 2 of 4 rows to max_length 16 (data.too_long: truncate)" in r.lines()
    assert r.train_tokens == sum(len(e["input_ids"]) for e in data.train)
    assert r.supervised_tokens == sum(len(e["input_ids"]) - 1 for e in data.train)


def test_too_long_drop(gpt2_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", LENGTHS_ROWS)
    data = prepare_data(DataConfig(train=str(path), max_length=16, too_long="drop"), gpt2_tokenizer, seed=0)
    assert (data.report.train_rows, data.report.truncated, data.report.dropped) == (2, 0, 2)
    assert "dropped 2 of 4 rows longer than max_length 16 (data.too_long: drop)" in data.report.lines()
    assert all(len(e["input_ids"]) <= 16 for e in data.train)


def test_too_long_error_names_the_rows(gpt2_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", LENGTHS_ROWS)
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(train=str(path), max_length=16, too_long="error"), gpt2_tokenizer, seed=0)
    lengths = [len(gpt2_tokenizer(r["text"])["input_ids"]) + 1 for r in LENGTHS_ROWS]
    assert lengths[0] <= 16 < lengths[1] and lengths[2] <= 16 < lengths[3]
    assert "2 rows longer than max_length 16" in e.value.message
    assert f"t.jsonl row 2 (line 2): {lengths[1]} tokens" in e.value.message
    assert f"t.jsonl row 4 (line 4): {lengths[3]} tokens" in e.value.message
    assert "max_length" in e.value.hint and "truncate" in e.value.hint


def test_rows_left_without_supervised_tokens_are_dropped(gpt2_tokenizer):
    rows = [
        {"prompt": " ".join(["one"] * 30), "completion": " two"},  # answer cut off by truncation
        {"prompt": "one", "completion": " two"},
    ]
    examples, counts = tokenize(rows, gpt2_tokenizer, max_length=10)
    assert (counts.truncated, counts.dropped_no_supervised, counts.examples) == (1, 1, 1)
    assert supervised(gpt2_tokenizer, examples[0]) == " two<|endoftext|>"
    with pytest.raises(DataError, match="no examples left"):
        tokenize(rows[:1], gpt2_tokenizer, max_length=10)


# --------------------------------------------------------------------------- validation


def test_val_split_is_deterministic_and_disjoint(gpt2_tokenizer, tmp_path):
    words = "zero one two three four five six seven eight nine".split()
    rows = [{"text": f"{a} {b}"} for a in words[:4] for b in words[:5]]  # 20 distinct rows
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), val_split=0.25)

    def split(seed):
        d = prepare_data(cfg, gpt2_tokenizer, seed=seed)
        return [supervised(gpt2_tokenizer, e) for e in d.train], [supervised(gpt2_tokenizer, e) for e in d.validation]

    train, val = split(0)
    assert len(val) == 5 and len(train) == 15
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(f"{r['text']}<|endoftext|>" for r in rows)
    assert split(0) == (train, val)
    assert split(1)[1] != val
    tiny = DataConfig(train=cfg.train, val_split=0.01)
    assert prepare_data(tiny, gpt2_tokenizer, seed=0).report.validation_rows == 1  # at least one


def test_validation_files_and_override(gpt2_tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "one two"}, {"text": "three"}])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "four five"}])
    other = write_jsonl(tmp_path / "o.jsonl", [{"text": "six"}, {"text": "seven"}])
    d = prepare_data(DataConfig(train=str(train), validation=str(val), packing=True), gpt2_tokenizer, seed=0)
    assert [supervised(gpt2_tokenizer, e) for e in d.validation] == ["four five<|endoftext|>"]
    assert "position_ids" not in d.validation[0]  # validation is never packed
    d = prepare_data(
        DataConfig(train=str(train), validation=str(val)), gpt2_tokenizer, seed=0, validation_override=[str(other)]
    )
    assert d.report.validation_rows == 2
    assert prepare_data(DataConfig(train=str(train)), gpt2_tokenizer, seed=0).validation is None


# --------------------------------------------------------------------------- packing and collation


def test_pack_first_fit_decreasing():
    examples = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([5, 3, 8, 2, 6, 4, 1])]
    rows = pack(examples, 10)
    assert rows == pack(examples, 10)  # deterministic
    # FFD: 8 -> A, 6 -> B, 5 -> C, 4 -> B, 3 -> C, 2 -> A, 1 -> C
    assert [sorted(set(r["input_ids"])) for r in rows] == [[2, 3], [4, 5], [0, 1, 6]]
    for row in rows:
        assert len(row["input_ids"]) <= 10
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        for s, e in zip(starts, [*starts[1:], len(row["input_ids"])]):
            assert row["position_ids"][s:e] == list(range(e - s))
            assert row["labels"][s] == IGNORE_INDEX
            assert row["labels"][s + 1 : e] == row["input_ids"][s + 1 : e]
    assert sum(len(r["input_ids"]) for r in rows) == 29


def test_collator_unpacked_pads_right_and_keeps_eos_labels():
    eos = 7  # pad == eos: the real EOS must stay supervised, padding must not
    batch = Collator(pad_token_id=eos)(
        [
            {"input_ids": [1, 2, eos], "labels": [-100, 2, eos]},
            {"input_ids": [3, eos], "labels": [3, eos]},
        ]
    )
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[1, 2, eos], [3, eos, eos]]
    assert batch["labels"].tolist() == [[-100, 2, eos], [3, eos, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_collator_packed_has_position_ids_and_no_attention_mask():
    batch = Collator(pad_token_id=None)(
        [
            {"input_ids": [1, 2, 3, 4], "labels": [-100, 2, -100, 4], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [5], "labels": [-100], "position_ids": [0]},
        ]
    )
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, -100, 4], [-100, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 0, 1, 2]]
    batch = Collator(pad_token_id=9, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3] + [9] * 5]
    assert batch["attention_mask"].tolist() == [[1, 1, 1] + [0] * 5]


def _load_model(path, attn):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    model.config.use_cache = False  # what training uses; with a cache the packed rows leak
    return model.eval()


def _segment_losses(model, batch) -> dict[tuple, float]:
    """Per-example mean loss, keyed by the example's input_ids; segments split where position_ids restart."""
    import torch

    with torch.no_grad():
        logits = model(**batch).logits.float()
    out = {}
    for b in range(logits.shape[0]):
        pos = batch["position_ids"][b].tolist() if "position_ids" in batch else None
        n = len(batch["input_ids"][b]) if pos else int(batch["attention_mask"][b].sum())
        starts = [i for i, p in enumerate(pos) if p == 0] if pos else [0]
        for s, e in zip(starts, [*starts[1:], n]):
            labels = batch["labels"][b, s + 1 : e]
            if (labels != IGNORE_INDEX).sum() == 0:
                continue  # padding segment
            loss = torch.nn.functional.cross_entropy(logits[b, s : e - 1], labels, ignore_index=IGNORE_INDEX)
            out[tuple(batch["input_ids"][b, s:e].tolist())] = loss.item()
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packing_gives_the_unpacked_per_example_losses(arch, attn, request, tmp_path):
    from transformers import AutoTokenizer

    path = request.getfixturevalue(f"tiny_{arch}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    words = "one two three four five six seven eight nine ten".split()
    if arch == "llama":  # chat, so several supervised stretches per example
        rows = [
            {
                "messages": [
                    {"role": "user", "content": " ".join(words[: i + 1])},
                    {"role": "assistant", "content": " ".join(words[i:])},
                    {"role": "user", "content": "abc"},
                    {"role": "assistant", "content": words[i]},
                ]
            }
            for i in range(8)
        ]
    else:
        rows = [
            {"prompt": " ".join(words[: i + 1]), "completion": " " + " ".join(words[i : 2 * i + 2])} for i in range(8)
        ]
    data_path = write_jsonl(tmp_path / "d.jsonl", rows)
    max_length = 64 if arch == "gpt2" else 160  # several packed rows, so the batch has padding
    model = _load_model(path, attn)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = Collator(pad)

    unpacked = prepare_data(DataConfig(train=str(data_path), max_length=max_length), tokenizer, seed=0).train
    reference = {}
    for ex in unpacked:  # one example per forward: nothing to leak into
        reference.update(_segment_losses(model, collate([ex])))
    assert len(reference) == len(rows)
    # A right-padded unpacked batch (attention_mask) gives the same losses.
    batched = _segment_losses(model, collate(unpacked))
    assert batched.keys() == reference.keys()
    assert max(abs(batched[k] - reference[k]) for k in reference) < 1e-4

    packed = prepare_data(DataConfig(train=str(data_path), max_length=max_length, packing=True), tokenizer, seed=0)
    assert 1 < packed.report.packed_rows == len(packed.train) < len(rows)
    assert len({len(r["input_ids"]) for r in packed.train}) > 1  # rows of different lengths: padding
    assert packed.report.supervised_tokens == sum(_count_supervised(e) for e in unpacked)
    batch = collate(packed.train)
    assert "attention_mask" not in batch
    losses = _segment_losses(model, batch)
    assert losses.keys() == reference.keys()
    assert max(abs(losses[k] - reference[k]) for k in reference) < 1e-4

    # The test can fail: with an all-ones mask the model sees one long sequence per row, and the
    # losses move by far more than the tolerance (random tiny models are nearly uniform, so the
    # shift is small in absolute terms: 2.5e-3 for gpt2, 9e-3 for llama).
    leaky = _segment_losses(model, dict(batch, attention_mask=batch["input_ids"].new_ones(batch["input_ids"].shape)))
    assert max(abs(leaky[k] - reference[k]) for k in reference) > 1e-3


def _count_supervised(example) -> int:
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


def test_report_lines_for_a_packed_run(gpt2_tokenizer, tmp_path):
    rows = [{"text": " ".join(["one"] * n)} for n in range(1, 21)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    r = prepare_data(
        DataConfig(train=str(path), packing=True, max_length=32, val_split=0.1), gpt2_tokenizer, seed=3
    ).report
    text = "\n".join(r.lines())
    assert f"data: 20 rows from {path}, format text (auto-detected)" in text
    assert "validation: 2 examples from the training rows (val_split 0.1, seed 3)" in text
    assert f"packed 18 examples into {r.packed_rows} rows of at most 32 tokens" in text
    assert 0 <= r.padding_fraction < 0.5 and len(r.fingerprint) == 16
    r = prepare_data(DataConfig(train=str(path), system_prompt="be kind"), gpt2_tokenizer, seed=3).report
    assert "data.system_prompt is not used: it applies to chat data, and this data is text" in r.lines()


def test_importing_data_does_not_import_torch():
    code = ("import sys, lora_cli.data.prepare, lora_cli.data.preview; "
            "sys.exit(any(m in sys.modules for m in ('torch', 'transformers', 'datasets')))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --------------------------------------------------------------------------- bad input


def _bad_utf8(tmp):
    (p := tmp / "latin1.jsonl").write_bytes('{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1"))
    return p


def _bad_json_line(tmp):
    (p := tmp / "bad.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c" "d"}\n')
    return p


def _pretty_jsonl(tmp):
    (p := tmp / "pretty.jsonl").write_text(json.dumps([{"text": "a"}], indent=2))
    return p


def _jsonl_named_json(tmp):
    (p := tmp / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    return p


def _rows(name, rows):
    return lambda tmp: write_jsonl(tmp / name, rows)


def _text(name, text):
    def make(tmp):
        (p := tmp / name).write_text(text)
        return p

    return make


BAD = [
    # id, make(tmp) -> path, tokenizer, substrings of the message, substring of the hint
    (
        "missing-file",
        lambda tmp: tmp / "nope" / "train.jsonl",
        "gpt2",
        ["data file not found", "nope/train.jsonl"],
        "relative to the current directory",
    ),
    ("directory", lambda tmp: tmp, "gpt2", ["is a directory"], "name the files"),
    (
        "unsupported-extension",
        _text("train.xlsx", "x"),
        "gpt2",
        ["train.xlsx", "unsupported file type '.xlsx'"],
        ".jsonl",
    ),
    ("non-utf8", _bad_utf8, "gpt2", ["latin1.jsonl", "not valid UTF-8 at byte 28 (line 2)"], "UTF-8"),
    (
        "utf16",
        lambda tmp: (tmp / "u.jsonl").write_bytes('{"text": "a"}'.encode("utf-16")) and tmp / "u.jsonl",
        "gpt2",
        ["u.jsonl", "UTF-16"],
        "UTF-8",
    ),
    (
        "bad-json-line",
        _bad_json_line,
        "gpt2",
        ["bad.jsonl line 4: not valid JSON: Expecting ',' delimiter"],
        "one complete JSON object",
    ),
    ("pretty-printed-jsonl", _pretty_jsonl, "gpt2", ["pretty.jsonl line 1: not valid JSON"], "name the file .json"),
    (
        "jsonl-named-json",
        _jsonl_named_json,
        "gpt2",
        ["lines.json line 2 column 1: not valid JSON: Extra data"],
        ".jsonl",
    ),
    ("json-not-a-list", _text("d.json", '{"rows": []}'), "gpt2", ["d.json", "keys rows"], "JSON list"),
    (
        "jsonl-not-an-object",
        _text("a.jsonl", '{"text": "a"}\n["text"]\n'),
        "gpt2",
        ["a.jsonl line 2: expected a JSON object", "got a list"],
        None,
    ),
    (
        "csv-unterminated-quote",
        _text("q.csv", 'text\nok\n"never closed\n'),
        "gpt2",
        ["q.csv line 3: not valid CSV"],
        "quote",
    ),
    (
        "gzip",
        lambda tmp: (tmp / "z.jsonl").write_bytes(__import__("gzip").compress(b"{}")) and tmp / "z.jsonl",
        "gpt2",
        ["z.jsonl: the file is gzip-compressed"],
        "decompress",
    ),
    (
        "csv-wrong-field-count",
        _text("d.csv", "text,id\nhello,1\nhello,world,2\n"),
        "gpt2",
        ["d.csv row 2 (line 3): has 3 fields, the header has 2"],
        "quote fields",
    ),
    (
        "missing-field",
        _rows("alp.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "outptu": "b"}]),
        "gpt2",
        ["alp.jsonl row 2 (line 2): missing field 'output'", "outptu"],
        "alpaca rows need",
    ),
    (
        "missing-field-csv",
        _text("c.csv", "prompt,answer\nhi,yo\n"),
        "gpt2",
        ["cannot tell the data format", "prompt, answer"],
        "completion {prompt, completion}",
    ),
    (
        "wrong-type",
        _rows("w.jsonl", [{"prompt": "a", "completion": ["b", "c"]}]),
        "gpt2",
        ["w.jsonl row 1 (line 1): field 'completion' must be a string, got a list"],
        "completion rows need",
    ),
    (
        "null-field",
        _rows("n.jsonl", [{"text": "a"}, {"text": None}]),
        "gpt2",
        ["n.jsonl row 2 (line 2): field 'text' must be a string, got null"],
        None,
    ),
    (
        "many-bad-rows",
        _rows("m.jsonl", [{"text": "ok"}] + [{"text": i} for i in range(7)]),
        "gpt2",
        ["7 bad rows (text format), first 5 shown", "m.jsonl row 6 (line 6)", "got a number"],
        None,
    ),
    (
        "unknown-role",
        _rows("c.jsonl", [CHAT, {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}]),
        "llama",
        ["c.jsonl row 2 (line 2): message 1: unknown role 'bot'", "system, user, assistant, tool"],
        None,
    ),
    (
        "content-not-string",
        _rows("c.jsonl", [{"messages": [{"role": "user", "content": [{"type": "text"}]}]}]),
        "llama",
        ["row 1 (line 1): message 0: 'content' must be a string, got a list"],
        None,
    ),
    (
        "content-null",
        _rows("c.jsonl", [{"messages": [{"role": "user", "content": None}]}]),
        "llama",
        ["row 1 (line 1): message 0: 'content' must be a string, got null"],
        None,
    ),
    (
        "messages-not-list",
        _rows("c.jsonl", [{"messages": {"role": "user"}}]),
        "llama",
        ["field 'messages' must be a list of messages, got an object"],
        None,
    ),
    ("chat-without-template", _rows("c.jsonl", [CHAT]), "gpt2", ["c.jsonl", "chat template"], "format: completion"),
    ("empty-file", _text("empty.jsonl", "\n\n"), "gpt2", ["empty.jsonl: no rows"], None),
    ("empty-csv", _text("empty.csv", "text\n"), "gpt2", ["empty.csv: no rows"], None),
    (
        "unknown-columns",
        _rows("u.jsonl", [{"question": "a", "answer": "b"}]),
        "gpt2",
        ["u.jsonl row 1 (line 1): cannot tell the data format from the columns: question, answer"],
        "chat {messages}",
    ),
    ("not-parquet", _text("p.parquet", "not parquet"), "gpt2", ["p.parquet: cannot read as Parquet"], "Parquet"),
    (
        "hub-id-offline",
        lambda tmp: "no-such-owner/no-such-dataset",
        "gpt2",
        ["could not load hub dataset 'no-such-owner/no-such-dataset'"],
        "local file",
    ),
]


@pytest.mark.parametrize("make, tok, message_parts, hint_part", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_data_error_naming_file_and_row(tmp_path, request, make, tok, message_parts, hint_part):
    tokenizer = request.getfixturevalue(f"{tok}_tokenizer")
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(train=str(make(tmp_path))), tokenizer, seed=0)
    for part in message_parts:
        assert part in e.value.message
    if hint_part:
        assert hint_part in e.value.hint
    assert e.value.exit_code == 2


def test_val_split_that_leaves_nothing_is_an_error(gpt2_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}])
    with pytest.raises(DataError, match="leaving none to train on"):
        prepare_data(DataConfig(train=str(path), val_split=0.5), gpt2_tokenizer, seed=0)


def test_a_data_path_without_its_extension_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    from lora_cli.data.records import load_records

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chat.jsonl").write_text('{"text": "a"}\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="data file not found: data/chat") as info:
        load_records("data/chat")  # looks like a hub id owner/name
    assert "did you mean data/chat.jsonl?" in info.value.hint


def test_a_csv_with_only_a_header_is_called_that(tmp_path):
    from lora_cli.data.records import load_records

    (tmp_path / "h.csv").write_text("prompt,completion\n")
    with pytest.raises(DataError, match=r"no rows \(only a header\)"):
        load_records(str(tmp_path / "h.csv"))
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match=r"no rows \(the file is empty\)"):
        load_records(str(tmp_path / "e.csv"))
