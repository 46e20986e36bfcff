"""The converted copy of a GGUF file is keyed by the file's bytes: every virtualenv's copy of the
built-in model's wheel shares one 0.5 GB conversion instead of adding its own."""

import json
import os
import shutil

from lora_cli.model.gguf_cache import content_digest, converted_gguf_dir


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


def test_a_copy_under_another_name_finds_the_converted_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "cache"))
    original = _file(tmp_path / "model.gguf", b"weights", 1_000_000_000)
    converted = converted_gguf_dir(original)
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")  # as convert_gguf leaves it
    assert converted_gguf_dir(_file(tmp_path / "renamed.gguf", b"weights", 2_000_000_000)) == converted


def test_a_wrong_value_in_the_index_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "cache"))
    gguf = _file(tmp_path / "model.gguf", b"weights", 1_000_000_000)
    expected = content_digest(gguf)
    index_path = tmp_path / "cache" / "gguf" / "digests.json"
    key = next(iter(json.loads(index_path.read_text())))
    for wrong in (None, 12, "0" * 64 + "zz", ["x"]):
        index_path.write_text(json.dumps({key: wrong}))
        assert content_digest(gguf) == expected


def test_an_unwritable_cache_is_named_before_converting(tmp_path, monkeypatch):
    import pytest

    from lora_cli.errors import ModelError
    from lora_cli.model.gguf_cache import convert_gguf

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "file" / "cache"))  # under a file: cannot be made
    gguf = _file(tmp_path / "model.gguf", b"weights", 1_000_000_000)
    with pytest.raises(ModelError, match="cannot write the converted model to the cache") as info:
        convert_gguf(gguf)
    assert "LORA_CACHE_DIR" in info.value.hint
