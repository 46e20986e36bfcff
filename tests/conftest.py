"""Shared fixtures: tiny real models built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from tests.tiny import build_tiny_model

# Tests must never reach the network; users' hub ids are exercised through local directories.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run faster on one thread than on two (thread start-up dominates), and
# subprocesses started by tests inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")


torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request):
    """Each test using this runs once per architecture."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def gpt2_tokenizer(tiny_gpt2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gpt2)


@pytest.fixture(scope="session")
def llama_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def pytest_collection_modifyitems(config, items):
    """The real-model tests (marked slow: minutes each) first: with `pytest -n 2` (make test) one
    worker starts them while the other takes the many short tests, instead of one of them running
    alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
