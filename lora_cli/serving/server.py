"""The HTTP server (uvicorn) around the API: a socket bound before anything is served (so a port in
use is a clear error, and port 0 picks a free one), and SIGINT/SIGTERM ending it cleanly: rows in
flight are cut (their streams end properly), then `lora serve` exits 130 or 143 as every command
does, rather than uvicorn re-raising the signal after shutdown.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
import threading

from lora_cli.errors import LoraError
from lora_cli.serving.batching import Engine

# How long in-flight responses get to finish after a signal, once the engine has cut their rows.
GRACEFUL_SECONDS = 5


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise LoraError(f"--host {host}: cannot resolve it ({e.strerror})",
                        "Use an address of this machine, e.g. 127.0.0.1 (default) or 0.0.0.0 (all).") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-stopped server's port is free again
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LoraError(f"port {port} on {host} is already in use",
                            f"Stop what listens there, or pick another port: --port {port + 1}.") from None
        if e.errno == errno.EACCES:
            raise LoraError(f"no permission to listen on port {port}",
                            "Ports below 1024 need root: use --port 8000.") from None
        raise LoraError(f"cannot listen on {host}:{port} ({e.strerror})",
                        "Use an address of this machine, e.g. 127.0.0.1 (default) or 0.0.0.0 (all).") from None
    sock.listen(128)
    return sock


def make_server(app, engine: Engine):
    """A uvicorn Server; `.run(sockets=[sock])` serves until a signal (or `.should_exit = True`);
    `.received` is then the signal that stopped it, if any."""
    import uvicorn

    class Server(uvicorn.Server):
        received: int | None = None

        def handle_exit(self, sig, frame) -> None:
            if self.received is None:
                self.received = sig
            engine.stop(wait=False)  # cut the rows in flight so their streams end now
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own re-raises the signal after shutting down (SIGTERM would kill us
            # uncleanly): ours only records it, and serve exits with the code for it.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=GRACEFUL_SECONDS)
    return Server(config)
