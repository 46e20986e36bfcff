"""The OpenAI request bodies we accept, checked field by field: a bad one is an `ApiError` that
the API turns into OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, with a
4xx status, naming the field and what it must be.

Fields of OpenAI's API that we do not implement are accepted at their neutral value (e.g.
`presence_penalty: 0`, `logprobs: false`) and refused otherwise; a field OpenAI does not have
is refused, so a misspelt `max_token` never silently means the default.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_cli.serving.batching import Sampling

DEFAULT_MAX_TOKENS = 256  # `lora generate`'s --max-new-tokens default
MAX_STOP_STRINGS = 4  # as OpenAI


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Parsed:
    model: str
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts
    sampling: Sampling  # max_tokens still as asked (None: the default), capped once the prompt is known
    max_tokens: int | None
    messages: list[dict] | None = None  # chat
    prompt: str | None = None  # completions


COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user",
          "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}
CHAT = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
                 "parallel_tool_calls", "service_tier", "store", "metadata"}
COMPLETIONS = COMMON | {"prompt", "echo", "suffix", "best_of"}
# OpenAI fields we accept only at the value that means "not used".
NEUTRAL = {"presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "logit_bias": (None, {}),
           "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
           "best_of": (None, 1), "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None,),
           "response_format": (None, {"type": "text"}), "service_tier": (None, "auto", "default"),
           "store": (None, False), "metadata": (None,)}


def parse_chat(body) -> Parsed:
    fields = _object(body, CHAT)
    messages = _required(fields, "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects", param="messages")
    parsed = _common(fields)
    if "max_completion_tokens" in fields and fields["max_completion_tokens"] is not None:
        parsed.max_tokens = _max_tokens(fields["max_completion_tokens"], "max_completion_tokens")
    parsed.messages = [_message(m, i) for i, m in enumerate(messages)]
    return parsed


def parse_completion(body) -> Parsed:
    fields = _object(body, COMPLETIONS)
    prompt = _required(fields, "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # the client libraries' one-prompt batch
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
    if not prompt.strip():
        raise ApiError(400, "'prompt' is empty", param="prompt")
    parsed = _common(fields)
    parsed.prompt = prompt
    return parsed


def _object(body, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}", param=unknown[0], code="unknown_field")
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise ApiError(400, f"{name!r} is not supported by this server (only {neutral[-1]!r})", param=name,
                           code="unsupported_parameter")
    return body


def _required(fields: dict, name: str):
    if fields.get(name) is None:
        raise ApiError(400, f"missing required field {name!r}", param=name, code="missing_field")
    return fields[name]


def _common(fields: dict) -> Parsed:
    model = _required(fields, "model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    max_tokens = _max_tokens(fields.get("max_tokens"), "max_tokens")
    temperature = _number(fields, "temperature", 1.0)
    if temperature < 0:
        raise ApiError(400, f"'temperature' must be 0 (greedy) or more, got {temperature:g}", param="temperature")
    top_p = _number(fields, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p:g}", param="top_p")
    n = fields.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(400, f"'n' must be 1 (one answer per request), got {n!r}", param="n")
    stream = fields.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    options = fields.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "'stream_options' may only hold include_usage (true or false)", param="stream_options")
    seed = fields.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, "'seed' must be an integer", param="seed")
    if fields.get("user") is not None and not isinstance(fields["user"], str):
        raise ApiError(400, "'user' must be a string", param="user")
    sampling = Sampling(max_tokens=max_tokens or DEFAULT_MAX_TOKENS, temperature=temperature, top_p=top_p,
                        seed=None if seed is None else seed % 2**63, stop=_stop(fields.get("stop")))
    return Parsed(model, bool(stream), bool((options or {}).get("include_usage")), sampling, max_tokens)


def _max_tokens(value, name: str) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ApiError(400, f"'{name}' must be an integer of at least 1, got {value!r}", param=name)
    return value


def _number(fields: dict, name: str, default: float) -> float:
    value = fields.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ApiError(400, f"'{name}' must be a number, got {value!r}", param=name)
    return float(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or an array of them", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' holds at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    return tuple(stops)


ROLES = ("system", "developer", "user", "assistant")


def _message(message, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"'{where}' must be an object with role and content", param=where)
    unknown = sorted(set(message) - {"role", "content", "name"})
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r} in '{where}'", param=f"{where}.{unknown[0]}",
                       code="unknown_field")
    role = message.get("role")
    if role not in ROLES:
        raise ApiError(400, f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"'{where}.content' parts must be {{type: text, text}} (no images or audio)",
                           param=f"{where}.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"'{where}.content' must be a string", param=f"{where}.content")
    # "developer" is OpenAI's newer name for the system role; chat templates know "system"
    return {"role": "system" if role == "developer" else role, "content": content}
