"""The chat formats a GGUF export knows: recognised by rendering the tokenizer's own chat template,
then written as llama.cpp's end-of-turn token and as an Ollama TEMPLATE.

A format is recognised only when the tokenizer's template renders a test conversation exactly as
the format does, so a Modelfile never carries a template that formats prompts differently from
training. A default system prompt the template inserts (SmolLM2's "You are a helpful AI
assistant named SmolLM...") is found the same way and becomes the Modelfile's SYSTEM.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFormat:
    name: str
    turn_start: str  # before the role
    role_end: str  # between the role and the content
    turn_end: str  # the end-of-turn token, then what follows it
    end_of_turn: str  # the token that ends a turn: llama.cpp's EOT, Ollama's stop
    bos_in_template: bool  # the template writes the BOS token itself (llama.cpp adds it instead)
    strip_content: bool  # the template trims each message's content

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """What the format makes of `messages` (the reference the tokenizer's template must match)."""
        out = []
        for message in messages:
            content = message["content"].strip() if self.strip_content else message["content"]
            out.append(f"{self.turn_start}{message['role']}{self.role_end}{content}{self.turn_end}")
        if add_generation_prompt:
            out.append(f"{self.turn_start}assistant{self.role_end}")
        return "".join(out)

    def ollama_template(self) -> str:
        """The same rendering in Ollama's Go template language. Ollama puts the Modelfile's SYSTEM
        (or a request's system message) first in .Messages, so every role is rendered by one loop."""
        # (the formats' own text holds no `{{`, so it stands in the template as it is)
        return (f"{{{{- range .Messages }}}}{self.turn_start}{{{{ .Role }}}}{self.role_end}{{{{ .Content }}}}"
                f"{self.turn_end}{{{{ end }}}}{self.turn_start}assistant{self.role_end}")


CHATML = ChatFormat("chatml", "<|im_start|>", "\n", "<|im_end|>\n", "<|im_end|>",
                    bos_in_template=False, strip_content=False)
LLAMA3 = ChatFormat("llama3", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>", "<|eot_id|>",
                    bos_in_template=True, strip_content=True)
FORMATS = (CHATML, LLAMA3)

# A conversation whose every part is distinct, so a template that drops, reorders or reformats
# anything cannot render it the way a format does.
PROBE_CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Define: lexicographer"},
    {"role": "assistant", "content": "A pestilent fellow who records words."},
    {"role": "user", "content": "Define: cynic"},
]


@dataclass(frozen=True)
class DetectedChat:
    format: ChatFormat
    default_system: str | None  # what the template inserts when the conversation has no system message


def render_with(tokenizer, messages: list[dict]) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that wants other roles or arguments: not a format we know
        return None


def detect_chat_format(tokenizer) -> DetectedChat | None:
    """The format the tokenizer's chat template renders, with its default system prompt; None
    when it has no template or one no known format reproduces."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    rendered = render_with(tokenizer, PROBE_CONVERSATION)
    without_system = render_with(tokenizer, PROBE_CONVERSATION[1:])
    if rendered is None or without_system is None:
        return None
    bos = tokenizer.bos_token or ""
    for fmt in FORMATS:
        prefix = bos if fmt.bos_in_template else ""
        if rendered != prefix + fmt.render(PROBE_CONVERSATION):
            continue
        if without_system == prefix + fmt.render(PROBE_CONVERSATION[1:]):
            return DetectedChat(fmt, None)
        default = _inserted_system(fmt, without_system[len(prefix):])
        if default is not None:
            return DetectedChat(fmt, default)
    return None


def _inserted_system(fmt: ChatFormat, text: str) -> str | None:
    """The system message a template put before the conversation, if that is all it added."""
    head = f"{fmt.turn_start}system{fmt.role_end}"
    rest = fmt.render(PROBE_CONVERSATION[1:])
    if not (text.startswith(head) and text.endswith(rest)):
        return None
    middle = text[len(head):len(text) - len(rest)]
    if not middle.endswith(fmt.turn_end):
        return None
    system = middle[: len(middle) - len(fmt.turn_end)]
    return system if fmt.render([{"role": "system", "content": system}], False) + rest == text else None
