"""A small renderer for the part of Go's text/template that Ollama Modelfile TEMPLATEs use (field
access, range, if/else, trim markers), with Ollama's handling of the conversation: the Modelfile's
SYSTEM becomes the first message when the request has none. Enough to check our TEMPLATEs render
what the tokenizer's chat template renders, without Ollama itself (not installable here)."""

from __future__ import annotations

import re

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _tokens(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with Go's trim markers applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = template[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def _parse(tokens: list, i: int = 0, stop: tuple[str, ...] = ()) -> tuple[list, int, str | None]:
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        i += 1
        if kind == "text":
            nodes.append(("text", value))
        elif value in stop:
            return nodes, i, value
        elif value.startswith("range "):
            body, i, _ = _parse(tokens, i, ("end",))
            nodes.append(("range", value[6:].strip(), body))
        elif value.startswith("if "):
            body, i, ended = _parse(tokens, i, ("end", "else"))
            other = []
            if ended == "else":
                other, i, _ = _parse(tokens, i, ("end",))
            nodes.append(("if", value[3:].strip(), body, other))
        else:
            nodes.append(("field", value))
    return nodes, i, None


def _value(expr: str, scope: dict, root: dict):
    if not expr.startswith("."):
        raise ValueError(f"unsupported expression {expr!r}")
    source = root if expr.startswith("$.") else scope
    return source.get(expr.lstrip("$.")) if expr.strip(".") else scope


def _render(nodes: list, scope: dict, root: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(str(_value(node[1], scope, root) or ""))
        elif node[0] == "range":
            for item in _value(node[1], scope, root) or []:
                out.append(_render(node[2], item, root))
        elif node[0] == "if":
            out.append(_render(node[2] if _value(node[1], scope, root) else node[3], scope, root))
    return "".join(out)


def render_ollama(template: str, messages: list[dict], system: str | None = None) -> str:
    """What Ollama sends the model for a chat request with `messages` and the Modelfile's SYSTEM."""
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    variables = {
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
        "System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
        "Prompt": messages[-1]["content"] if messages else "",
    }
    nodes, _, _ = _parse(_tokens(template))
    return _render(nodes, variables, variables)
