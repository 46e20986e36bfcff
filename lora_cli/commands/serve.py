"""`lora serve`: runs as named adapters on their one base (and the base itself) behind an
OpenAI-compatible HTTP API, concurrent requests decoded together (docs/serving.md).

Flags and names are checked and the port is bound before the model loads, so a typo or a port in
use is said at once; SIGINT/SIGTERM cut the answers in flight and exit 130/143.
"""

from __future__ import annotations

import os
import signal

from lora_cli.console import info
from lora_cli.errors import Interrupted, LoraError
from lora_cli.serving.api import create_app
from lora_cli.serving.batching import Engine
from lora_cli.serving.registry import load_registry, parse_spec
from lora_cli.serving.server import bind, make_server


def run(
    runs: list[str] | None = None,
    *,
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 16,
    prefix_cache: bool = True,
) -> None:
    runs = list(runs or [])
    if not 0 <= port <= 65535:
        raise LoraError(f"--port must be in 0-65535, got {port}", "e.g. --port 8000 (0: any free port).")
    if max_batch < 1:
        raise LoraError(f"--max-batch must be at least 1, got {max_batch}", "e.g. --max-batch 16.")
    if api_key is not None and not api_key.strip():
        raise LoraError("--api-key is empty", "Pass the key clients must send, or drop --api-key.")
    for spec in runs:
        parse_spec(spec)  # a bad NAME=RUN before anything else
    # OpenMP's threads spin between the engine's forward passes, which can starve the threads that
    # serve HTTP and stream text; not spinning at all makes every op wait for its threads to wake.
    # A short spin (libgomp's count) then sleep was fastest on 2 cores: SmolLM2-135M, one client,
    # 14-15 tokens/s against 8.5 sleeping at once and 11.5 spinning always. Read when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "100000")
    sock = bind(host, port)
    try:
        registry = load_registry(runs, model)
        engine = Engine(registry, max_batch=max_batch, prefix_cache=prefix_cache)
        engine.start()
        server = make_server(create_app(registry, engine, api_key=api_key), engine)
        where = sock.getsockname()
        url = f"http://{host if ':' not in host else f'[{host}]'}:{where[1]}/v1"
        info(f"serving {', '.join(registry.names)} at {url} (batches of up to {max_batch}"
             f"{', API key required' if api_key else ''}); Ctrl-C stops")
        server.run(sockets=[sock])
    finally:
        sock.close()
    engine.stop()
    if server.received is not None:
        name = "Ctrl-C" if server.received == signal.SIGINT else signal.Signals(server.received).name
        raise Interrupted(f"stopped by {name}", exit_code=130 if server.received == signal.SIGINT
                          else 128 + int(server.received))
