"""Which process of a run is gone when one is: the message a survivor prints names the failed
node and rank instead of a gloo/NCCL socket address.

At the start every rank opens a listening TCP socket of its own (port 0: any free one) and the
ranks swap (rank, node, host, address, port) once. A process that is killed, crashes or loses its
machine stops answering there: its socket closes with it (a connection is refused at once) or the
machine no longer replies (the probe gives up after PROBE_SECONDS). Nothing runs in between: the
kernel completes a probe's connection in the socket's backlog without our code, so there is no
thread and no cost per step. The survivors probe only once something already failed
(commands/train.py, through distributed.peer_lost).
"""

from __future__ import annotations

import contextlib
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lora_cli import ranks

PROBE_SECONDS = 2.0


@dataclass(frozen=True)
class Peer:
    rank: int
    node: int  # torchrun's GROUP_RANK: the machine_rank of the launcher that started it
    host: str
    address: str
    port: int


_listener: socket.socket | None = None
_peers: list[Peer] = []


def node_rank() -> int:
    """This process's node: torchrun's GROUP_RANK (accelerate's --machine_rank)."""
    try:
        return int(os.environ.get("GROUP_RANK", 0))
    except ValueError:
        return 0


def _reachable_address() -> str:
    """The address the other nodes reach this one at: the local end of the route to the master
    (MASTER_ADDR, which every node reaches); no packet is sent (UDP connect only picks a route)."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((master, int(os.environ.get("MASTER_PORT", 29500) or 29500)))
        return s.getsockname()[0]
    return "127.0.0.1"


def register() -> None:
    """Open this rank's socket and learn every rank's (a collective: every rank calls it once)."""
    global _listener, _peers
    import torch.distributed

    if _listener is None:
        _listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _listener.bind(("", 0))
        _listener.listen(64)  # probes are only ever made after a failure: a few at most
    me = Peer(ranks.rank(), node_rank(), socket.gethostname(), _reachable_address(), _listener.getsockname()[1])
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, me)
    _peers = sorted(everyone, key=lambda p: p.rank)


def _answers(peer: Peer) -> bool:
    try:
        with socket.create_connection((peer.address, peer.port), timeout=PROBE_SECONDS):
            return True
    except OSError:
        return False


def gone() -> list[Peer]:
    """The other ranks that no longer answer (empty when none was registered or all answer)."""
    others = [p for p in _peers if p.rank != ranks.rank()]
    if not others:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(others))) as pool:
        answers = list(pool.map(_answers, others))
    return [p for p, alive in zip(others, answers) if not alive]


def describe(lost: list[Peer]) -> str:
    """'rank 1 (node 1, host gpu-b)', or a whole node: 'node 1 (host gpu-b, ranks 8-15)'."""
    by_node: dict[int, list[Peer]] = {}
    for peer in lost:
        by_node.setdefault(peer.node, []).append(peer)
    parts = []
    for node, peers in sorted(by_node.items()):
        on_node = [p for p in _peers if p.node == node]
        if len(peers) == len(on_node) and len(on_node) > 1:
            parts.append(f"node {node} (host {peers[0].host}, ranks {_span([p.rank for p in peers])})")
        else:
            parts += [f"rank {p.rank} (node {node}, host {p.host})" for p in peers]
    return ", ".join(parts)


def _span(numbers: list[int]) -> str:
    numbers = sorted(numbers)
    contiguous = numbers == list(range(numbers[0], numbers[-1] + 1))
    return f"{numbers[0]}-{numbers[-1]}" if contiguous and len(numbers) > 2 else ", ".join(map(str, numbers))
