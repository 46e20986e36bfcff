"""`lora chat` on tiny real chat runs, fed through stdin: greedy answers equal `lora generate`'s,
history rendered with the chat template, /adapter /base /reset /exit, Ctrl-C stopping an answer
but not the chat, and bad input exiting 2."""

from __future__ import annotations

import io

import pytest
import torch

from lora_cli.commands.generate import run as run_generate
from lora_cli.errors import EXIT_USAGE
from lora_cli.serving.batching import Engine, Sampling
from lora_cli.serving.chat import ChatSession, chat_loop
from lora_cli.serving.registry import load_registry
from tests.helpers import chat_rows, lora_in_process, train_tiny_run

TOKENS = 8
SYSTEM = "You are terse."


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("chat-runs")
    fast = {"max_steps": 20, "save_every": 1000}
    return {
        "pirate": train_tiny_run(tmp, "pirate", tiny_llama, chat_rows(), train=fast, data={"system_prompt": SYSTEM}),
        "lawyer": train_tiny_run(tmp, "lawyer", tiny_llama, chat_rows(), train={**fast, "max_steps": 10}),
        "llama": tiny_llama,
    }


def generated(run, prompt: str, *, base: bool = False) -> str:
    [result] = run_generate(prompt, run=run, base=base, chat=True, temperature=0, max_new_tokens=TOKENS,
                            stream=False, stdout=io.StringIO())
    return result["output"]


def greedy_on_history(model_dir, adapter, messages: list[dict], *, base: bool = False) -> str:
    """model.generate on the whole conversation, with nothing but transformers + peft (base: the
    adapter's tokenizer, the base's weights)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if not base:
        model = PeftModel.from_pretrained(model, adapter)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS,
                                    do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def chat(monkeypatch, capsys, *args, stdin: str):
    return lora_in_process(monkeypatch, capsys, "chat", *args, "--temperature", "0", "--max-new-tokens", TOKENS,
                           stdin=stdin)


def test_turns_answer_like_generate_and_keep_the_history(runs, monkeypatch, capsys):
    code, out, err = chat(monkeypatch, capsys, runs["pirate"], stdin="Define: fox\nDefine: dog\n/exit\nnever read\n")
    assert code == 0, err
    first = generated(runs["pirate"], "Define: fox")
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Define: fox"},
               {"role": "assistant", "content": first}, {"role": "user", "content": "Define: dog"}]
    second = greedy_on_history(runs["llama"], runs["pirate"] / "adapter", history)
    assert out == f"{first}\n{second}\n"  # each answer on its line; /exit ended the chat before the last


def test_adapter_base_and_reset_commands(runs, monkeypatch, capsys):
    lines = ["Define: fox", "/adapter lawyer", "Define: fox", "/base", "Define: fox", "/adapter nobody", "/reset",
             "/adapter pirate", "Define: fox", "/help"]
    code, out, err = chat(monkeypatch, capsys, runs["pirate"], runs["lawyer"], stdin="\n".join(lines) + "\n")
    assert code == 0, err
    fox = generated(runs["pirate"], "Define: fox")
    # /adapter and /base keep the conversation: the answers continue it (lawyer has no system prompt)
    turn = [{"role": "user", "content": "Define: fox"}]
    lawyer = greedy_on_history(runs["llama"], runs["lawyer"] / "adapter", [*turn, {"role": "assistant",
                                                                                   "content": fox}, *turn])
    base = greedy_on_history(runs["llama"], runs["lawyer"] / "adapter",
                             [*turn, {"role": "assistant", "content": fox}, *turn,
                              {"role": "assistant", "content": lawyer}, *turn], base=True)
    assert out == f"{fox}\n{lawyer}\n{base}\n{fox}\n"  # after /reset, back on pirate: the first answer again
    assert "no adapter 'nobody'; loaded: pirate, lawyer" in err
    assert "answering with the base model" in err and "conversation cleared" in err and "/reset" in err


def test_base_answers_as_generate_base(runs, monkeypatch, capsys):
    code, out, err = chat(monkeypatch, capsys, runs["pirate"], stdin="/base\nDefine: fox\n")
    assert code == 0, err
    assert out == generated(runs["pirate"], "Define: fox", base=True) + "\n"


class CtrlCOnce(io.StringIO):
    """stdout whose first write of an answer raises KeyboardInterrupt, as Ctrl-C would."""

    def __init__(self):
        super().__init__()
        self.pressed = False

    def write(self, text):
        if not self.pressed and text.strip():
            self.pressed = True
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_answer_not_the_chat(runs):
    registry = load_registry([str(runs["pirate"])], None)
    engine = Engine(registry, max_batch=1)
    engine.start()
    try:
        session = ChatSession(registry, engine, Sampling(max_tokens=TOKENS))
        out, err = CtrlCOnce(), io.StringIO()
        chat_loop(session, io.StringIO("Define: dog\nDefine: fox\n"), out, err)
    finally:
        engine.stop()
    assert "[stopped]" in err.getvalue()
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == ""  # nothing was shown of the stopped answer
    assert session.history[3]["content"] != ""
    assert out.getvalue() == "\n" + session.history[3]["content"] + "\n"


def test_bad_input_exits_2(runs, tmp_path, monkeypatch, capsys):
    code, _, err = chat(monkeypatch, capsys, tmp_path / "missing", stdin="")
    assert code == EXIT_USAGE and "does not exist" in err
    code, _, err = lora_in_process(monkeypatch, capsys, "chat", runs["pirate"], "--temperature", "-1", stdin="")
    assert code == EXIT_USAGE and "temperature" in err
