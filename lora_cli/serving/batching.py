"""Continuous batching: every request in flight is decoded in one forward pass per step, each row
through its own adapter (stacked_lora.py for a mix, "__base__" for the base).

One thread owns the model. The requests waiting when the engine looks are prefilled together, in
one forward pass (left-padded, each with its own position ids and adapter), and their KV caches
join the running batch between two steps, left-padded to the batch's length: the attention mask
hides the padding, and each row carries its own position ids, so a row decodes as it would alone
(its greedy tokens are `lora generate`'s: tested). A row leaves the batch when it
ends (EOS, a stop string, max_tokens) or its client goes away; padding that no row needs any
more is cut off. Each row samples with its own temperature, top_p and seeded generator, so a
seeded answer does not depend on what else is in the batch.

Clients see `Event`s through the `emit` callback they hand in (called on the engine thread).
"""

from __future__ import annotations

import queue
import random
import threading
from dataclasses import dataclass, field
from typing import Callable

from lora_cli.console import first_line
from lora_cli.errors import is_out_of_memory
from lora_cli.serving.prefix_cache import PrefixCache
from lora_cli.serving.registry import BASE_ROUTE, Registry, Served
from lora_cli.serving.stacked_lora import install_stacked_lora
from lora_cli.serving.text import TextStream


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 500  # errors: the HTTP status they mean


class Job:
    """One request: what to generate, and where its events go."""

    def __init__(self, served: Served, prompt_ids: list[int], sampling: Sampling, emit: Callable[[Event], None]):
        self.served = served
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self.emit = emit
        self.cancelled = False  # set by the client's side (it went away); the engine drops the row

    def cancel(self) -> None:
        self.cancelled = True

    def send(self, event: Event) -> None:
        try:
            self.emit(event)
        except Exception:  # a client's closed loop or queue must never stop the engine
            pass


@dataclass
class _Row:
    job: Job
    text: TextStream
    generator: object  # torch.Generator
    length: int  # tokens of this row in the KV cache (its next position id)
    last: int = -1  # the token to feed next
    generated: list[int] = field(default_factory=list)
    done: bool = False


class Engine:
    def __init__(self, registry: Registry, *, max_batch: int = 16, prefix_cache: bool = True):
        self.registry = registry
        self.model = registry.model
        # mixed-adapter steps about as fast as one adapter's (None: peft's own mixed path)
        self._router = install_stacked_lora(self.model) if registry.has_adapters else None
        self.max_batch = max_batch
        self._incoming: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._rows: list[_Row] = []
        self._cache = None  # the batch's KV cache (transformers DynamicCache), rows in _rows order
        self._mask = None  # [rows, cache length] attention mask: 0 on left padding
        self.prefixes = PrefixCache() if prefix_cache else None
        self.stats = {"active": 0, "queued": 0, "finished": 0, "cancelled": 0, "steps": 0, "largest_batch": 0,
                      "prefix_hits": 0, "prefix_tokens_reused": 0}

    # ------------------------------------------------------------------ the client side

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lora-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            job.send(Event("error", text="the server is shutting down", status=503))
            return
        self._incoming.put(job)
        self.stats["queued"] = self._incoming.qsize()

    def stop(self, *, wait: bool = True, timeout: float = 10.0) -> None:
        """Cut the rows in flight (they end with finish_reason "length"), refuse queued ones."""
        self._stopping.set()
        self._incoming.put(None)  # wakes a waiting engine
        if wait and self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        import torch

        with torch.no_grad():
            while not self._stopping.is_set():
                try:
                    self._admit(block=not self._rows)
                    self._leave([r for r in self._rows if r.job.cancelled], cancelled=True)
                    if self._rows:
                        self._step()
                except Exception as e:  # a failed step fails its rows, never the server
                    self._fail_all(e)
                self.stats.update(active=len(self._rows), queued=self._incoming.qsize())
        for row in self._rows:
            self._finish(row, "length")
        self._rows, self._cache, self._mask = [], None, None
        while True:
            try:
                job = self._incoming.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.send(Event("error", text="the server is shutting down", status=503))
        self.stats.update(active=0, queued=0)

    def _admit(self, *, block: bool) -> None:
        """Take the requests waiting now (up to the batch's room) and read their prompts together."""
        room = self.max_batch - len(self._rows)
        jobs = []
        while len(jobs) < room:
            try:
                job = self._incoming.get(timeout=0.2) if block else self._incoming.get_nowait()
            except queue.Empty:
                break
            block = False
            if job is None or job.cancelled:
                if job is not None:
                    self.stats["cancelled"] += 1
                continue
            jobs.append(job)
        if not jobs:
            return
        try:
            self._prefill(jobs)
        except Exception as e:
            for job in jobs:
                if is_out_of_memory(e):
                    job.send(Event("error", text="out of memory while reading the prompt", status=503))
                else:
                    job.send(Event("error", text=f"generation failed: {type(e).__name__}: {first_line(e, 200)}"))

    def _prefill(self, jobs: list[Job]) -> None:
        """Read the prompts, sample each first token, and join the batch with the rows not already
        done. Prompts whose start is cached (prefix_cache.py) are read together from where their
        cached start ends; the others together from their first token."""
        starts = [self.prefixes.lookup(job.served.route, job.prompt_ids) if self.prefixes else None for job in jobs]
        cold = [job for job, start in zip(jobs, starts) if start is None]
        warm = [(job, start) for job, start in zip(jobs, starts) if start is not None]
        if cold:
            self._prefill_group(cold, [])
        if warm:
            self._prefill_group([job for job, _ in warm], [start for _, start in warm])

    def _prefill_group(self, jobs: list[Job], starts: list) -> None:
        """One forward pass over the prompts (left-padded, each with its own positions and adapter),
        on top of their cached starts cut to the shortest of them when `starts` are given."""
        import torch
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        skip = min((len(start.ids) for start in starts), default=0)
        width = max(len(job.prompt_ids) - skip for job in jobs)
        ids = torch.zeros(len(jobs), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(jobs), skip + width, dtype=torch.long, device=device)
        mask[:, :skip] = 1
        for i, job in enumerate(jobs):
            rest = job.prompt_ids[skip:]
            ids[i, width - len(rest):] = torch.tensor(rest, device=device)
            mask[i, skip + width - len(rest):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, skip:]
        past = None
        if starts:
            past = DynamicCache(ddp_cache_data=[
                (torch.cat([start.layers[n][0][:, :, :skip] for start in starts]),
                 torch.cat([start.layers[n][1][:, :, :skip] for start in starts]))
                for n in range(len(starts[0].layers))])
            for start in starts:
                self.prefixes.count_hit(start, skip)
        out = self._forward(ids, mask, positions, past, [job.served.route for job in jobs])
        if self.prefixes:
            self._remember_starts(jobs, out.past_key_values, mask)
            self.stats.update(self.prefixes.stats)
        rows = []
        for i, job in enumerate(jobs):
            seed = job.sampling.seed if job.sampling.seed is not None else random.randrange(2**63)
            row = _Row(job, TextStream(job.served.tokenizer, job.sampling.stop),
                       torch.Generator(device=device).manual_seed(seed), length=len(job.prompt_ids))
            self._accept(row, out.logits[i, -1])
            rows.append(row)
        self._join(rows, out.past_key_values, mask)
        self._leave([row for row in rows if row.done])

    def _remember_starts(self, jobs: list[Job], cache, mask) -> None:
        """Keep the KV of the start each prompt shares with a recent one of its route, cut from the
        cache this forward pass just made (its columns in order, padding skipped)."""
        for i, job in enumerate(jobs):
            shared = self.prefixes.shared_start(job.served.route, job.prompt_ids)
            if shared:
                columns = mask[i].nonzero().squeeze(-1)[:shared]
                layers = [(layer.keys[i:i + 1, :, columns].clone(), layer.values[i:i + 1, :, columns].clone())
                          for layer in cache.layers]
                self.prefixes.add(job.served.route, job.prompt_ids[:shared], layers)

    def _step(self) -> None:
        """One token for every row, in one forward pass."""
        import torch

        rows = self._rows
        device = self._mask.device
        ids = torch.tensor([[r.last] for r in rows], device=device)
        positions = torch.tensor([[r.length] for r in rows], device=device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        out = self._forward(ids, mask, positions, self._cache, [r.job.served.route for r in rows])
        self._cache, self._mask = out.past_key_values, mask
        self.stats["steps"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        logits = out.logits[:, -1]
        for i, row in enumerate(rows):
            row.length += 1
            self._accept(row, logits[i])
        self._leave([r for r in rows if r.done])

    def _forward(self, ids, mask, positions, cache, routes: list[str]):
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": True, "logits_to_keep": 1}
        if positions is not None:
            kwargs["position_ids"] = positions
        if cache is not None:
            kwargs["past_key_values"] = cache
        if not self.registry.has_adapters:
            return self.model(**kwargs)
        # The base alone also goes through the router when there is one: its LoRA layers then
        # skip the adapters outright, where peft's disable_adapter() walks every module twice per
        # call (~70 ms of a ~65 ms decoding step on SmolLM2-135M).
        if len(set(routes)) > 1 or (routes[0] == BASE_ROUTE and self._router is not None):
            if self._router is None:
                return self.model(**kwargs, adapter_names=routes)
            self._router.routes = routes
            try:
                return self.model(**kwargs)
            finally:
                self._router.routes = None
        # Every row on one route: peft's plain path (its mixed-batch path splits and re-gathers the
        # batch in every LoRA layer: 2x slower per token on SmolLM2-135M with one client).
        if routes[0] == BASE_ROUTE:
            with self.model.disable_adapter():
                return self.model(**kwargs)
        if self.model.active_adapter != routes[0]:
            self.model.set_adapter(routes[0])
        return self.model(**kwargs)

    # ------------------------------------------------------------------ rows

    def _accept(self, row: _Row, logits) -> None:
        """Sample the row's next token, send its text, end it if it is done."""
        token = self._sample(row, logits)
        if token is None:
            return
        row.generated.append(token)
        row.last = token
        piece = row.text.add(token)
        if piece:
            row.job.send(Event("text", text=piece))
        if token in row.job.served.eos_ids or row.text.stopped:
            self._finish(row, "stop")
        elif len(row.generated) >= row.job.sampling.max_tokens:
            self._finish(row, "length")

    def _sample(self, row: _Row, logits) -> int | None:
        import torch

        logits = logits.float()
        if torch.isnan(logits).any() or torch.isposinf(logits).any() or not torch.isfinite(logits).any():
            # what FiniteLogits stops `lora generate` for: a broken adapter or overflowing weights
            what = "the adapter's" if row.job.served.route != "__base__" else "the model's"
            row.job.send(Event("error", text=f"{what} outputs are not finite (NaN or inf)", status=500))
            row.done = True
            return None
        sampling = row.job.sampling
        if sampling.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        if sampling.top_p < 1:
            # keep the smallest set of likeliest tokens whose probability reaches top_p
            sorted_probs, order = torch.sort(probs, descending=True)
            drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > sampling.top_p
            probs = probs.clone()
            probs[order[drop]] = 0
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _finish(self, row: _Row, reason: str) -> None:
        rest = row.text.finish()
        if rest:
            row.job.send(Event("text", text=rest))
        row.job.send(Event("done", finish_reason=reason, prompt_tokens=len(row.job.prompt_ids),
                           completion_tokens=len(row.generated)))
        row.done = True
        self.stats["finished"] += 1

    def _fail_all(self, error: Exception) -> None:
        message = "out of memory" if is_out_of_memory(error) else f"{type(error).__name__}: {first_line(error, 200)}"
        for row in self._rows:
            row.job.send(Event("error", text=f"generation failed: {message}", status=500))
        self._rows, self._cache, self._mask = [], None, None

    # ------------------------------------------------------------------ the batch's cache

    def _join(self, rows: list[_Row], cache, mask) -> None:
        """Append prefilled rows' cache to the batch's, left-padding the narrower of the two."""
        import torch

        if self._cache is None:
            self._cache, self._mask, self._rows = cache, mask, list(rows)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for layer, new in zip(self._cache.layers, cache.layers):
            layer.keys = torch.cat([_left_pad(layer.keys, width), _left_pad(new.keys, width)], dim=0)
            layer.values = torch.cat([_left_pad(layer.values, width), _left_pad(new.values, width)], dim=0)
        self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)], dim=0)
        self._rows.extend(rows)

    def _leave(self, gone: list[_Row], *, cancelled: bool = False) -> None:
        """Rows out of the batch (and of its cache); padding no remaining row needs is cut off."""
        import torch

        if not gone:
            return
        if cancelled:
            self.stats["cancelled"] += len(gone)
        leaving = {id(r) for r in gone}
        keep = [i for i, r in enumerate(self._rows) if id(r) not in leaving]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])  # the first column some row still uses
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self._mask = mask[:, start:]
        self._rows = [self._rows[i] for i in keep]


def _left_pad(tensor, width: int):
    import torch

    missing = width - tensor.shape[-2]
    if missing <= 0:
        return tensor
    shape = (*tensor.shape[:-2], missing, tensor.shape[-1])
    return torch.cat([tensor.new_zeros(shape), tensor], dim=-2)


def _left_pad_mask(mask, width: int):
    import torch

    missing = width - mask.shape[1]
    if missing <= 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)
