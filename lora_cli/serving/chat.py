"""`lora chat`'s conversation: turns kept as history and rendered with the run's chat template
(its system prompt first), answers streamed as they are decoded, and the slash commands.

The answers come from the same `Engine` the server uses (one row at a time here), so a greedy
answer is `lora generate`'s. The engine runs on its own thread: Ctrl-C reaches this one while it
waits for text, cancels the row and keeps the conversation (the part of the answer shown so far
stays in the history).
"""

from __future__ import annotations

import dataclasses
import queue
import sys

from lora_cli.serving.batching import Engine, Event, Job, Sampling
from lora_cli.serving.prompts import chat_prompt_ids, fit_to_context
from lora_cli.serving.registry import BASE_ROUTE, Registry, Served
from lora_cli.serving.requests import ApiError

HELP = """commands:
  /reset         forget the conversation
  /adapter NAME  answer with another loaded adapter: {names}
  /base          answer with the base model alone (same weights, adapter off; A/B the adapter)
  /exit          end the chat (also Ctrl-D); Ctrl-C stops an answer"""


class ChatSession:
    def __init__(self, registry: Registry, engine: Engine, sampling: Sampling, *, system: str | None = None):
        self.registry, self.engine, self.sampling = registry, engine, sampling
        adapters = [s for s in registry.served.values() if s.route != BASE_ROUTE]
        self.style = adapters[0] if adapters else registry.base  # whose template and system prompt
        if system is not None:
            self.style = dataclasses.replace(self.style, system_prompt=system or None)
        self.system = system
        self.use_base = not adapters
        self.history: list[dict] = []

    @property
    def speaker(self) -> Served:
        """Who answers: the current adapter, or the base with that adapter's template (A/B)."""
        if self.use_base:
            return dataclasses.replace(self.style, name=self.registry.base.name, route=BASE_ROUTE)
        return self.style

    def command(self, line: str, err) -> bool:
        """A slash command; False when it ends the chat."""
        word, _, argument = line.strip().partition(" ")
        argument = argument.strip()
        adapters = [n for n, s in self.registry.served.items() if s.route != BASE_ROUTE]
        if word in ("/exit", "/quit"):
            return False
        if word == "/reset":
            self.history = []
            print("(conversation cleared)", file=err)
        elif word == "/base":
            self.use_base = True
            print(f"(answering with the base model {self.registry.base.name}, adapter off)", file=err)
        elif word == "/adapter":
            if not adapters:
                print("(no adapters loaded: this chat runs a plain model)", file=err)
            elif argument not in adapters:
                print(f"(no adapter {argument!r}; loaded: {', '.join(adapters)})", file=err)
            else:
                self.style = self.registry.served[argument]
                if self.system is not None:
                    self.style = dataclasses.replace(self.style, system_prompt=self.system or None)
                self.use_base = False
                print(f"(answering with adapter {argument})", file=err)
        else:
            print(HELP.format(names=", ".join(adapters) or "none"), file=err)
        return True

    def answer(self, text: str, out, err) -> str | None:
        """Stream an answer to `text` onto `out`; it and the question join the history."""
        speaker = self.speaker
        messages = [*self.history, {"role": "user", "content": text}]
        try:
            ids = chat_prompt_ids(speaker, messages)
            max_tokens = fit_to_context(len(ids), self.sampling.max_tokens, self.registry.context, "messages")
        except ApiError as e:
            hint = " (/reset starts over)" if e.code == "context_length_exceeded" else ""
            print(f"error: {e.message}{hint}", file=err)
            return None
        events: queue.Queue[Event] = queue.Queue()
        job = Job(speaker, ids, dataclasses.replace(self.sampling, max_tokens=max_tokens), events.put)
        self.engine.submit(job)
        pieces: list[str] = []
        try:
            while True:
                try:
                    event = events.get(timeout=0.1)  # short waits: Ctrl-C lands between them
                except queue.Empty:
                    continue
                if event.kind == "text":
                    out.write(event.text)
                    out.flush()
                    pieces.append(event.text)  # what the user saw is what the history keeps
                    continue
                if event.kind == "error":
                    print(f"\nerror: {event.text}", file=err)
                    return None
                break
        except KeyboardInterrupt:
            job.cancel()
            print(" [stopped]", file=err)
        out.write("\n")
        out.flush()
        reply = "".join(pieces)
        self.history = [*messages, {"role": "assistant", "content": reply}]
        return reply


def chat_loop(session: ChatSession, stdin=None, stdout=None, stderr=None) -> None:
    """Read turns until /exit or end of input."""
    stdin, out, err = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    names = ", ".join(session.registry.names)
    print(f"chatting with {session.speaker.name} (loaded: {names}); /help lists the commands", file=err)
    while True:
        try:
            line = input("> ") + "\n" if interactive and stdin is sys.stdin else stdin.readline()
        except EOFError:
            line = ""
        except KeyboardInterrupt:
            print("\n(Ctrl-C stops an answer; /exit or Ctrl-D ends the chat)", file=err)
            continue
        if not line:  # end of input
            break
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line, err):
                break
            continue
        session.answer(line, out, err)
