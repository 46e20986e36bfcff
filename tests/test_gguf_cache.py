"""The converted copy of a GGUF file is keyed by the file's bytes: every virtualenv's copy of the
built-in model's wheel shares one 0.5 GB conversion instead of adding its own."""

import json
import os
import shutil

from lora_cli.gguf_cache import content_digest, converted_gguf_dir


def _file(path, data: bytes, mtime: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime, mtime))
    return path


def test_copies_of_one_file_share_a_converted_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "cache"))
    data = os.urandom(3 << 20)
    in_venv_a = _file(tmp_path / "venv-a" / "model.gguf", data, 1_000_000_000)
    in_venv_b = _file(tmp_path / "venv-b" / "model.gguf", data, 2_000_000_000)
    other = _file(tmp_path / "venv-c" / "model.gguf", data[:-1] + bytes([data[-1] ^ 1]), 1_000_000_000)

    assert converted_gguf_dir(in_venv_a) == converted_gguf_dir(in_venv_b)
    assert converted_gguf_dir(other) != converted_gguf_dir(in_venv_a)
    assert converted_gguf_dir(in_venv_a).parent == tmp_path / "cache" / "gguf"
    assert converted_gguf_dir(in_venv_a).name.startswith("model-")


def test_the_digest_is_remembered_per_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "cache"))
    gguf = _file(tmp_path / "model.gguf", b"first version", 1_000_000_000)
    first = content_digest(gguf)
    index = json.loads((tmp_path / "cache" / "gguf" / "digests.json").read_text())
    assert list(index.values()) == [first]

    # A rewritten file (new bytes, new mtime) is hashed again, not served the old digest.
    _file(gguf, b"second version", 2_000_000_000)
    second = content_digest(gguf)
    assert second != first
    assert content_digest(_file(tmp_path / "copy.gguf", b"first version", 3_000_000_000)) == first


def test_a_damaged_index_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "cache"))
    gguf = _file(tmp_path / "model.gguf", b"weights", 1_000_000_000)
    expected = content_digest(gguf)
    shutil.rmtree(tmp_path / "cache")
    (tmp_path / "cache" / "gguf").mkdir(parents=True)
    (tmp_path / "cache" / "gguf" / "digests.json").write_text("{not json")
    assert content_digest(gguf) == expected
    assert json.loads((tmp_path / "cache" / "gguf" / "digests.json").read_text())
