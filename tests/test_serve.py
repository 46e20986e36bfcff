"""`lora serve` on tiny real runs: the official openai client (streaming and not) against a server in
this process, greedy answers equal to `lora generate --temperature 0` alone and in a mixed batch of
8 concurrent requests over 3 adapters + base, OpenAI-shaped errors for bad requests, the API key,
disconnects freeing their rows, bad command lines, and SIGTERM through the real CLI."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from lora_cli.commands.generate import run as run_generate
from lora_cli.errors import EXIT_USAGE
from lora_cli.inference.generation import encode_prompt
from lora_cli.serving.api import create_app
from lora_cli.serving.batching import Engine, Job, Sampling
from lora_cli.serving.registry import load_registry
from lora_cli.serving.server import bind, make_server
from tests.helpers import chat_rows, completion_rows, lora_in_process, train_tiny_run

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-test-key"
TOKENS = 10


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, tiny_gpt2):
    tmp = tmp_path_factory.mktemp("serve-runs")
    fast = {"max_steps": 20, "save_every": 1000}
    return {
        "pirate": train_tiny_run(tmp, "pirate", tiny_llama, chat_rows(), train=fast,
                                 data={"system_prompt": "You are terse."}),
        "lawyer": train_tiny_run(tmp, "lawyer", tiny_llama, chat_rows(), train={**fast, "max_steps": 10}),
        "plain": train_tiny_run(tmp, "plain", tiny_llama, completion_rows(), train=fast),
        "gpt2": train_tiny_run(tmp, "gpt2-run", tiny_gpt2, completion_rows(), train=fast),
        "llama": tiny_llama,
    }


class InProcessServer:
    """The real app and uvicorn on a free port, in a thread of this process."""

    def __init__(self, registry, engine, api_key=None):
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = make_server(create_app(registry, engine, api_key=api_key), engine)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(runs):
    registry = load_registry([str(runs["pirate"]), str(runs["lawyer"]), f"plain2={runs['plain']}"], None)
    engine = Engine(registry, max_batch=16)
    engine.start()
    open_server = InProcessServer(registry, engine)
    keyed = InProcessServer(registry, engine, api_key=KEY)
    yield {"url": open_server.url, "keyed": keyed.url, "registry": registry, "engine": engine,
           "base": str(runs["llama"])}
    open_server.close()
    keyed.close()
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server["url"] + "/v1", api_key="unused", timeout=60, max_retries=0)


_REFERENCES: dict = {}


def generated(target: Path | str, prompt: str, *, chat: bool, base: bool = False, tokens: int = TOKENS) -> str:
    """What `lora generate --temperature 0` answers (a run, or with --model a plain model)."""
    key = (str(target), prompt, chat, base, tokens)
    if key not in _REFERENCES:
        where = {"model": str(target)} if Path(target, "config.json").is_file() else {"run": target, "base": base}
        [result] = run_generate(prompt, chat=chat, temperature=0, max_new_tokens=tokens, stream=False,
                                stdout=io.StringIO(), **where)
        _REFERENCES[key] = result["output"]
    return _REFERENCES[key]


def test_models_lists_every_adapter_and_the_base(client, server):
    names = [m.id for m in client.models.list().data]
    assert names == ["pirate", "lawyer", "plain2", server["base"]]


def test_chat_completion_equals_generate(client, runs, server):
    reply = client.chat.completions.create(model="pirate", messages=[{"role": "user", "content": "Define: fox"}],
                                           max_tokens=TOKENS, temperature=0)
    expected = generated(runs["pirate"], "Define: fox", chat=True)
    assert reply.choices[0].message.content == expected
    assert "quick" in expected  # the adapter learned its pair: base and adapter really differ
    assert reply.choices[0].finish_reason in ("stop", "length")
    tokenizer = server["registry"].served["pirate"].tokenizer
    assert reply.usage.prompt_tokens == len(tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Define: fox"}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert reply.usage.completion_tokens <= TOKENS
    base = client.chat.completions.create(model=server["base"], messages=[{"role": "user", "content": "Define: fox"}],
                                          max_tokens=TOKENS, temperature=0)
    assert base.choices[0].message.content == generated(runs["llama"], "Define: fox", chat=True)
    assert base.choices[0].message.content != expected


def test_streaming_sends_the_same_text_in_pieces(client, runs):
    stream = client.chat.completions.create(model="pirate", messages=[{"role": "user", "content": "Define: dog"}],
                                            max_tokens=TOKENS, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == generated(runs["pirate"], "Define: dog", chat=True)
    assert len(pieces) > 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= len(pieces)


def test_completions_use_the_raw_prompt_like_generate(client, runs, server):
    reply = client.completions.create(model="plain2", prompt="Define: one\n", max_tokens=TOKENS, temperature=0)
    assert reply.choices[0].text == generated(runs["plain"], "Define: one\n", chat=False)
    stream = client.completions.create(model=server["base"], prompt="Define: one\n", max_tokens=TOKENS,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == generated(runs["llama"], "Define: one\n", chat=False)


def test_a_mixed_batch_of_8_answers_each_as_generate_alone(client, runs, server):
    """8 concurrent requests over 3 adapters + base, decoded together, each equal to its greedy
    answer alone."""
    asks = [("pirate", "Define: fox", True), ("lawyer", "Define: dog", True), ("plain2", "Define: ten\n", False),
            (server["base"], "Define: paris", True), ("pirate", "Define: world and more words here", True),
            ("lawyer", "Define: model", True), ("plain2", "the quick brown\n", False),
            (server["base"], "once upon a time there was", False)]
    targets = {"pirate": runs["pirate"], "lawyer": runs["lawyer"], "plain2": runs["plain"],
               server["base"]: runs["llama"]}
    expected = [generated(targets[m], p, chat=c) for m, p, c in asks]
    before = server["engine"].stats["largest_batch"]

    def ask(item):
        model, prompt, chat = item
        if chat:
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=TOKENS, temperature=0)
            return reply.choices[0].message.content
        return client.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0).choices[0].text

    stats = server["engine"].stats
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, asks))
    assert answers == expected
    assert stats["largest_batch"] >= max(before, 3)  # they really shared forward passes
    assert server["engine"]._router is not None  # through the stacked LoRA layers (serving/stacked_lora.py)

    # Asked again: the pirate's and the lawyer's two chat prompts each shared their template's start
    # in the first round, so now they are read on top of its cached KV, and answer the same.
    hits, reused = stats["prefix_hits"], stats["prefix_tokens_reused"]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, asks)) == expected
    assert stats["prefix_hits"] >= hits + 4
    assert stats["prefix_tokens_reused"] >= reused + 4 * server["engine"].prefixes.min_tokens


def test_stacked_lora_layer_equals_peft_mixed_batch(server):
    """One layer, rows on different adapters and the base: the stacked forward gives peft's own
    mixed-batch output."""
    import torch
    from peft.tuners.lora.layer import Linear

    model = server["registry"].model
    layer = next(m for m in model.modules() if isinstance(m, Linear))
    routes = [s.route for s in server["registry"].served.values()]
    x = torch.randn(len(routes), 3, layer.in_features, generator=torch.Generator().manual_seed(0))
    ours = layer(x, adapter_names=routes)
    peft = type(layer)._mixed_batch_forward(layer, x, adapter_names=routes)
    assert len(set(routes)) >= 3 and torch.allclose(ours, peft, atol=1e-5)
    assert not torch.allclose(ours[0], layer.base_layer(x)[0])  # the adapter row really differs


def test_gpt2_rows_of_different_lengths_decode_as_alone(runs):
    """Absolute position embeddings (GPT-2): left-padded rows joining a running batch keep their
    positions; adapter and base rows mixed."""
    registry = load_registry([str(runs["gpt2"])], None)
    engine = Engine(registry)
    asks = [("gpt2-run", "Define: fox\n"), (registry.base.name, "Define: dog\n"),
            ("gpt2-run", "one two three four five six seven eight nine ten\n"), ("gpt2-run", "Define: paris\n")]
    done, texts = threading.Semaphore(0), {}

    def collect(i):
        def emit(event):
            texts.setdefault(i, []).append(event.text if event.kind == "text" else "")
            if event.kind != "text":
                done.release()
        return emit

    jobs = [Job(registry.served[name], encode_prompt(registry.served[name].tokenizer, prompt, chat=False),
                Sampling(max_tokens=TOKENS), collect(i)) for i, (name, prompt) in enumerate(asks)]
    for job in jobs:  # queued before the engine starts: they go in together
        engine.submit(job)
    engine.start()
    for _ in jobs:
        assert done.acquire(timeout=60)
    engine.stop()
    for i, (name, prompt) in enumerate(asks):
        base = name != "gpt2-run"
        assert "".join(texts[i]) == generated(runs["gpt2"], prompt, chat=False, base=base), (name, prompt)


def test_seeded_sampling_repeats_whatever_else_is_in_the_batch(client):
    def sample(seed):
        return client.completions.create(model="plain2", prompt="Define: fox\n", max_tokens=12, temperature=1.0,
                                         seed=seed).choices[0].text

    first = sample(7)
    with ThreadPoolExecutor(3) as pool:
        again = list(pool.map(sample, [7, 8, 7]))
    assert again[0] == again[2] == first
    assert len({sample(s) for s in (1, 2, 3)} | {first}) > 1  # it really samples


def test_stop_strings_cut_the_answer(client, runs):
    full = generated(runs["pirate"], "Define: fox", chat=True)
    stop = full[2:5]
    reply = client.chat.completions.create(model="pirate", messages=[{"role": "user", "content": "Define: fox"}],
                                           max_tokens=TOKENS, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


GOOD = {"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_REQUESTS = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "pirate", "messages": [', 400, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("empty body", "/v1/chat/completions", b"", 400, None),
    ("missing messages", "/v1/chat/completions", {"model": "pirate"}, 400, "messages"),
    ("missing model", "/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("unknown field", "/v1/chat/completions", {**GOOD, "max_token": 5}, 400, "max_token"),
    ("bad role", "/v1/chat/completions", {**GOOD, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("unknown model", "/v1/chat/completions", {**GOOD, "model": "nope"}, 404, "model"),
    ("max_tokens 0", "/v1/completions", {"model": "plain2", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens -3", "/v1/chat/completions", {**GOOD, "max_tokens": -3}, 400, "max_tokens"),
    ("temperature < 0", "/v1/chat/completions", {**GOOD, "temperature": -0.5}, 400, "temperature"),
    ("temperature text", "/v1/chat/completions", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("top_p 0", "/v1/chat/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("n 2", "/v1/chat/completions", {**GOOD, "n": 2}, 400, "n"),
    ("penalty", "/v1/chat/completions", {**GOOD, "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("prompt past the context", "/v1/completions", {"model": "plain2", "prompt": "fox " * 400}, 400, "prompt"),
    ("oversized body", "/v1/completions", {"model": "plain2", "prompt": "x" * (2 << 20)}, 413, None),
    ("empty prompt", "/v1/completions", {"model": "plain2", "prompt": "  "}, 400, "prompt"),
]


@pytest.mark.parametrize("what,path,body,status,param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, what, path, body, status, param):
    with httpx.Client(base_url=server["url"], timeout=30) as http:
        sent = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
        assert sent.status_code == status, sent.text
        error = sent.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert "Traceback" not in sent.text
        if param is not None:
            assert error["param"] == param
        if what == "unknown model":
            assert "pirate, lawyer, plain2" in error["message"]
        assert http.post("/v1/chat/completions", json=GOOD).status_code == 200


def test_unknown_paths_and_methods_are_json_errors(server):
    with httpx.Client(base_url=server["url"], timeout=30) as http:
        assert http.get("/v1/nothing").status_code == 404
        assert http.get("/v1/chat/completions").json()["error"]["message"]
        assert http.get("/health").json()["status"] == "ok"


def test_api_key_is_required_when_set(server):
    with httpx.Client(base_url=server["keyed"], timeout=30) as http:
        assert http.post("/v1/chat/completions", json=GOOD).status_code == 401
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200  # for load balancers' probes
    keyed = OpenAI(base_url=server["keyed"] + "/v1", api_key=KEY, timeout=60, max_retries=0)
    assert keyed.chat.completions.create(**GOOD).choices[0].message.content is not None


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_clients_that_leave_mid_stream_free_their_rows(server, runs):
    engine = server["engine"]
    body = {"model": "pirate", "messages": [{"role": "user", "content": "Define: fox"}], "max_tokens": 200,
            "temperature": 1.0, "stream": True}

    def leave_early(http):
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the first event, then hang up

    with httpx.Client(base_url=server["url"], timeout=30) as http:
        for _ in range(10):
            leave_early(http)
        rss = _rss_mb()
        cancelled = engine.stats["cancelled"]
        for _ in range(100):
            leave_early(http)
        deadline = time.time() + 20
        while engine.stats["active"] or engine.stats["queued"]:
            assert time.time() < deadline, engine.stats
            time.sleep(0.05)
        assert engine.stats["cancelled"] - cancelled >= 90  # rows dropped, not decoded to 200 tokens
        assert _rss_mb() - rss < 50
        reply = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": TOKENS,
                                                         "temperature": 0})
        assert reply.json()["choices"][0]["message"]["content"] == generated(runs["pirate"], "Define: fox", chat=True)


def test_bad_command_lines_exit_2(runs, tmp_path, monkeypatch, capsys):
    cases = [
        ([runs["pirate"], runs["gpt2"]], "different bases"),
        ([tmp_path / "missing"], "does not exist"),
        (["=" + str(runs["pirate"])], "NAME=RUN"),
        ([f"a={runs['pirate']}", f"a={runs['lawyer']}"], "two runs are served as 'a'"),
        ([runs["pirate"], "--model", runs["gpt2"].parent.parent / "nothing"], "is not the base"),
    ]
    for args, said in cases:
        code, _, err = lora_in_process(monkeypatch, capsys, "serve", *args, "--port", "0")
        assert code == EXIT_USAGE, err
        assert said in err and "Traceback" not in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, _, err = lora_in_process(monkeypatch, capsys, "serve", runs["pirate"], "--port", port)
        assert code == EXIT_USAGE and f"port {port} on 127.0.0.1 is already in use" in err


def test_sigterm_cuts_streams_cleanly_and_exits_143(runs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lora_cli", "serve", str(runs["pirate"]), "--port", "0"],
                               cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.time() + 90
        while url is None and time.time() < deadline:
            line = process.stderr.readline()
            found = re.search(r"at (http://\S+)/v1", line)
            url = found.group(1) if found else None
            assert line or process.poll() is None, "lora serve ended before serving"
        assert url, "lora serve did not start"
        body = {"model": "pirate", "prompt": "Define: fox", "max_tokens": 200, "stream": True,
                "temperature": 1.0}
        with httpx.Client(base_url=url, timeout=30) as http, http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # cut, but the stream ends as a stream should
        assert process.wait(30) == 143
        assert "stopped by SIGTERM" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
