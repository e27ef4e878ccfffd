"""fileio: atomic writes leave the old file or the new one, never a temporary; readers name
the file and line at fault."""

import os

import pytest

from dice_jax.errors import DiceError
from dice_jax.fileio import (
    append_jsonl,
    atomic_file,
    atomic_write_bytes,
    read_json,
    read_json_rows,
    read_jsonl,
    write_json,
    write_jsonl,
)


def test_atomic_file_replaces_or_leaves_the_old_file(tmp_path):
    path = str(tmp_path / "a.txt")
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError), atomic_file(path, "w") as f:
        f.write("half")
        raise RuntimeError("killed")
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["a.txt"]
    with pytest.raises(DiceError, match="already exists"):
        atomic_write_bytes(path, b"new", overwrite=False)
    atomic_write_bytes(path, b"new")
    assert open(path, "rb").read() == b"new" and os.listdir(tmp_path) == ["a.txt"]


def test_json_formats(tmp_path):
    """The bytes every artifact has had: JSON indented, keys sorted, ASCII; JSONL in key
    order, UTF-8, one object a line (U+2028 inside a string stays on its line)."""
    path = str(tmp_path / "x.json")
    write_json(path, {"b": [1], "a": "é"})
    assert open(path, "rb").read() == b'{\n  "a": "\\u00e9",\n  "b": [\n    1\n  ]\n}\n'
    assert read_json(path) == {"a": "é", "b": [1]}
    rows = [{"z": "\u2028é", "a": 1}, {"b": None}]
    write_jsonl(str(tmp_path / "x.jsonl"), rows)
    assert open(tmp_path / "x.jsonl", "rb").read() == (
        '{"z": "\u2028é", "a": 1}\n{"b": null}\n'.encode())
    assert read_jsonl(str(tmp_path / "x.jsonl")) == rows
    assert read_json_rows(str(tmp_path / "x.jsonl")) == rows
    (tmp_path / "list.json").write_text(' [{"a": 1}]')
    assert read_json_rows(str(tmp_path / "list.json")) == [{"a": 1}]


def test_readers_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(DiceError, match=r"bad\.jsonl:3: not valid JSON"):
        read_jsonl(str(bad))
    with pytest.raises(DiceError, match=r"bad\.jsonl:3: not valid JSON"):
        read_json_rows(str(bad))
    with pytest.raises(DiceError, match=r"missing\.json: file not found"):
        read_json(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("[1,")
    with pytest.raises(DiceError, match=r"bad\.json: not valid JSON"):
        read_json_rows(str(tmp_path / "bad.json"))
    (tmp_path / "obj.json").write_text("[1] x")
    with pytest.raises(DiceError, match=r"obj\.json: not valid JSON"):
        read_json(str(tmp_path / "obj.json"))


def test_append_jsonl_and_torn_lines(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    append_jsonl(path, {"step": 1, "loss": 0.5})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # killed mid-line
    append_jsonl(path, {"step": 2, "loss": 0.25})
    assert open(path).read().startswith('{"loss": 0.5, "step": 1}\n')
    assert read_jsonl(path, skip_invalid=True) == [{"loss": 0.5, "step": 1}]
    with pytest.raises(DiceError, match=r"metrics\.jsonl:2"):
        read_jsonl(path)
