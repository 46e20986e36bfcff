"""Generated token ids turned into text piece by piece, the way a client sees it stream.

Each step decodes all of a row's ids (what `lora generate` decodes at the end, so the streamed
pieces add up to the same text) and sends what is new, holding back what might still change: a
partial UTF-8 character, trailing whitespace (a tokenizer's clean-up may drop a space before
punctuation) and the start of a stop string.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] | list[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # the answer so far (cut at a stop string once one appears)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string appeared

    def add(self, token: int) -> str:
        """Take one more token; return the text that is now safe to send (may be empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = text[: min(hits)], True
                return self._send(len(self.text))
        self.text = text
        if text.endswith("\ufffd"):  # a character whose bytes are not all generated yet
            return ""
        safe = len(text.rstrip())
        safe -= self._stop_prefix(text[:safe])
        return self._send(safe)

    def finish(self) -> str:
        """The rest of the text, when the answer ends."""
        return self._send(len(self.text))

    def _send(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : upto], upto
        return piece

    def _stop_prefix(self, text: str) -> int:
        """The length of the longest end of `text` that a stop string starts with."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
