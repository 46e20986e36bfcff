"""Requests turned into token ids the way `lora generate` formats prompts (so a greedy answer is
generate's, token for token), checked against the model's context.

Chat messages go through the tokenizer's chat template, the run's system prompt first when the
conversation has none (generate adds it the same way); a raw completion prompt is encoded as
generate encodes plain text.
"""

from __future__ import annotations

from lora_cli.console import first_line
from lora_cli.inference.generation import encode_prompt
from lora_cli.serving.registry import Served
from lora_cli.serving.requests import ApiError


def chat_prompt_ids(served: Served, messages: list[dict]) -> list[int]:
    tokenizer = served.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"model {served.name!r} has no chat template: send a raw prompt to /v1/completions",
                       param="model", code="no_chat_template")
    messages = list(messages)
    if served.system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": served.system_prompt})
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template's own checks (e.g. roles must alternate) speak for themselves
        raise ApiError(400, f"the chat template of {served.name!r} refused the messages: {first_line(e, 200)}",
                       param="messages") from None
    if not isinstance(text, str):
        text = text[0]
    return _nonempty(list(tokenizer(text, add_special_tokens=False)["input_ids"]), "messages")


def completion_prompt_ids(served: Served, prompt: str) -> list[int]:
    return _nonempty(encode_prompt(served.tokenizer, prompt, chat=False), "prompt")


def _nonempty(ids: list[int], param: str) -> list[int]:
    if not ids:
        raise ApiError(400, "the prompt encodes to no tokens", param=param)
    return ids


def fit_to_context(prompt_tokens: int, max_tokens: int, context: int | None, param: str) -> int:
    """max_tokens, cut to what the context leaves after the prompt (as generate cuts it); a prompt
    that fills the context is refused."""
    if context is None:
        return max_tokens
    if prompt_tokens >= context:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens, the model's context is {context}: shorten it",
                       param=param, code="context_length_exceeded")
    return min(max_tokens, context - prompt_tokens)
