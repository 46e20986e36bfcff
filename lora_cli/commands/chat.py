"""`lora chat`: a multi-turn conversation in the terminal with a run's adapter (or several, switched
with /adapter; /base answers with the base alone), streamed, in the run's chat template.

Ctrl-C stops the answer being written, not the chat; SIGTERM ends it with exit 143.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from lora_cli.errors import Interrupted, ModelError
from lora_cli.inference.generation import check_sampling
from lora_cli.serving.batching import Engine, Sampling
from lora_cli.serving.chat import ChatSession, chat_loop
from lora_cli.serving.registry import load_registry, parse_spec


def run(
    runs: list[str] | None = None,
    *,
    model: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int | None = None,
    stdin=None,
    stdout=None,
) -> None:
    runs = list(runs or [])
    check_sampling(max_new_tokens, temperature, top_p, 0)
    for spec in runs:
        parse_spec(spec)
    # OpenMP's threads spin between the engine's forward passes, which can starve the threads that
    # serve HTTP and stream text; not spinning at all makes every op wait for its threads to wake.
    # A short spin (libgomp's count) then sleep was fastest on 2 cores: SmolLM2-135M, one client,
    # 14-15 tokens/s against 8.5 sleeping at once and 11.5 spinning always. Read when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "100000")
    registry = load_registry(runs, model)
    if not any(getattr(s.tokenizer, "chat_template", None) for s in registry.served.values()):
        raise ModelError(f"{registry.base.name} has no chat template: `lora chat` needs one",
                         "Use a chat/instruct model or a run trained on chat data; `lora generate` takes plain text.")
    engine = Engine(registry, max_batch=1)
    engine.start()
    sampling = Sampling(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    session = ChatSession(registry, engine, sampling, system=system)

    def terminated(signum, frame):
        raise Interrupted("stopped by SIGTERM", exit_code=128 + signum)

    previous = signal.signal(signal.SIGTERM, terminated) if _main_thread() else None
    try:
        chat_loop(session, stdin, stdout)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        engine.stop()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread() and sys.platform != "win32"
