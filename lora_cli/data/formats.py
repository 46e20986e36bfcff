"""The four row formats and what each contributes: text, a prompt and its answer, or a chat
conversation with the character spans of its assistant turns.

    text        {"text"}                                 everything is trained on
    completion  {"prompt", "completion"}                 the completion
    alpaca      {"instruction", "input", "output"}       the output, after Stanford Alpaca's prompt
    chat        {"messages": [{"role", "content"}]}      the assistant turns, end-of-turn included
                (ShareGPT's "conversations" of {"from", "value"} read too)

A row's problem raises `RowProblem`; the tokenizer collects them into one DataError naming rows.
"""

from __future__ import annotations

import json

from lora_cli.console import type_name
from lora_cli.errors import DataError

CHAT_ROLES = ("system", "user", "assistant", "tool")

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # "conversations": [{"from", "value"}]


# The columns that identify each format, in the order `auto` tries them.
FORMAT_COLUMNS = {
    "preference": ("prompt", "chosen", "rejected"),  # train.method dpo/orpo: data/preference.py
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}

FORMAT_HELP = {
    "preference": 'preference rows need "prompt", "chosen" and "rejected": three non-empty strings, or '
    'three lists of {"role", "content"} messages (the prompt\'s turns, then one answer each)',
    "chat": 'chat rows need "messages": a list of {"role", "content"} objects, content a string '
    '(ShareGPT rows, "conversations" of {"from", "value"}, are read too)',
    "alpaca": 'alpaca rows need string fields "instruction" and "output" (and optionally "input")',
    "completion": 'completion rows need string fields "prompt" and "completion"',
    "text": 'text rows need a string field "text"',
}

FORMATS_LINE = (
    "chat {messages}; alpaca {instruction, input (optional), output}; "
    "completion {prompt, completion}; text {text}; preference {prompt, chosen, rejected} (train.method dpo/orpo)"
)


# Stanford Alpaca's prompt templates (github.com/tatsu-lab/stanford_alpaca, train.py).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


class RowProblem(Exception):
    """One row's problem; collected into a DataError that names the rows."""


def detect_format(record: dict, where: str) -> str:
    """The format whose columns the record has (chat, alpaca, completion, text, in that order)."""
    for fmt, columns in FORMAT_COLUMNS.items():
        if all(c in record for c in columns):
            return fmt
    if "conversations" in record:  # ShareGPT
        return "chat"
    found = ", ".join(map(str, record)) or "(none)"
    raise DataError(
        f"{where}: cannot tell the data format from the columns: {found}",
        f"rename the columns to one of the formats: {FORMATS_LINE}; or set data.format",
    )


def _field(record: dict, key: str, optional: bool = False) -> str:
    if key not in record or (optional and record[key] is None):
        if optional:
            return ""
        raise RowProblem(f"missing field '{key}' (the row has: {', '.join(map(str, record)) or 'nothing'})")
    value = record[key]
    if not isinstance(value, str):
        raise RowProblem(f"field '{key}' must be a string, got {type_name(value)}")
    return value


def chat_messages(record: dict, system_prompt: str | None) -> list[dict]:
    """The row's conversation as {"role", "content"} messages, checked, with the system prompt."""
    key = "conversations" if "messages" not in record and "conversations" in record else "messages"
    if key not in record:
        raise RowProblem(f"missing field 'messages' (the row has: {', '.join(map(str, record)) or 'nothing'})")
    messages = record[key]
    if isinstance(messages, str):  # CSV cells hold JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise RowProblem(f"field '{key}' is a string that is not a JSON list of messages") from None
    if not isinstance(messages, list):
        raise RowProblem(f"field '{key}' must be a list of messages, got {type_name(messages)}")
    if not messages:
        raise RowProblem(f"field '{key}' is an empty list")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowProblem(f"message {j}: must be an object {{\"role\", \"content\"}}, got {type_name(m)}")
        null_content = m.get("content", "") is None and not m.get("tool_calls")
        # Parquet/hub rows carry every struct key, null where absent; templates test `is defined`.
        m = {k: v for k, v in m.items() if v is not None}
        if "role" not in m and "from" in m:  # ShareGPT
            m["role"] = SHAREGPT_ROLES.get(m["from"], m["from"])
            if "content" not in m and "value" in m:
                m["content"] = m.pop("value")
            m.pop("from")
        role = m.get("role")
        if not isinstance(role, str):
            raise RowProblem(
                f"message {j}: "
                + ("missing 'role'" if role is None else f"'role' must be a string, got {type_name(role)}")
            )
        if role not in CHAT_ROLES:
            raise RowProblem(f"message {j}: unknown role '{role}' (allowed roles: {', '.join(CHAT_ROLES)})")
        if "content" not in m and m.get("tool_calls"):
            m["content"] = ""  # an assistant turn that only calls tools
        if "content" not in m:
            raise RowProblem(
                f"message {j}: " + ("'content' must be a string, got null" if null_content else "missing 'content'")
            )
        if not isinstance(m["content"], str):
            raise RowProblem(f"message {j}: 'content' must be a string, got {type_name(m['content'])}")
        out.append(m)
    if system_prompt and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def render_chat(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):  # some versions wrap a single render in a list
        text = text[0]
    return text


def chat_text_and_spans(tokenizer, messages: list[dict], train_on_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character spans of the assistant turns.

    An assistant turn runs from the end of the generation prompt before it to where the next
    message's render starts, so the template's end-of-turn tokens are learned too.
    """
    try:
        full = render_chat(tokenizer, messages)
    except Exception as e:
        raise RowProblem(f"the chat template rejected this conversation: {e}") from None
    if train_on_prompt:
        return full, [(0, len(full))]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            through = full if i == len(messages) - 1 else render_chat(tokenizer, messages[: i + 1])
        except Exception as e:
            raise RowProblem(f"the chat template rejected this conversation: {e}") from None
        try:
            before = render_chat(tokenizer, messages[:i], generation_prompt=True)
        except Exception:
            # Templates (and transformers) refuse an empty conversation: for a conversation that
            # opens with the assistant, its turn starts where its content does.
            at = through.find(m["content"]) if m["content"] else -1
            before = through[:at] if at >= 0 else ""
        if not through.startswith(before) or not full.startswith(through):
            raise RowProblem(
                f"message {i}: the chat template renders this turn differently depending on what "
                "follows, so the assistant's tokens cannot be located (use data.train_on_prompt: "
                "true, or format: completion)"
            )
        spans.append((len(before), len(through)))
    return full, spans


def prompt_and_answer(fmt: str, record: dict) -> tuple[str | None, str]:
    """(prompt, answer) for completion/alpaca; (None, text) for text."""
    if fmt == "text":
        return None, _field(record, "text")
    if fmt == "completion":
        return _field(record, "prompt"), _field(record, "completion")
    if fmt == "alpaca":
        instruction, output = _field(record, "instruction"), _field(record, "output")
        inp = _field(record, "input", optional=True)
        template = ALPACA_PROMPT if inp.strip() else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=instruction, input=inp), output
    raise ValueError(fmt)
