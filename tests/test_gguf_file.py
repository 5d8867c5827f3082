"""engine/gguf_file.py against gguf-py's GGUFReader (its reference twin) and on malformed files."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from engine.gguf_file import read_gguf
from engine.loader import smollm2_gguf_path


def test_smollm2_reads_as_gguf_py_reads_it() -> None:
    path = smollm2_gguf_path()
    ours, ref = read_gguf(path), gguf.GGUFReader(path)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(want)
    for key, value in want.items():
        assert ours.metadata[key] == value and type(ours.metadata[key]) is type(value), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert (a.tensor_type, a.shape, a.n_bytes) == (b.tensor_type, tuple(b.shape), b.n_bytes), a.name
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name
    assert {t.tensor_type.name for t in ours.tensors} >= {"F32", "Q8_0"}  # plain and quantized views both checked
    assert ours.metadata_end == max(f.offset + sum(p.nbytes for p in f.parts) for f in ref.fields.values())


def write(path: Path, tensors: dict[str, np.ndarray], **meta: object) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in meta.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint32(key, int(value))  # type: ignore[call-overload]
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_small_file_with_arrays_of_every_kind(tmp_path: Path) -> None:
    f = tmp_path / "a.gguf"
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    write(f, {"w": x, "h": np.ones(5, dtype=np.float16)}, **{"t.strings": ["a", "bé", ""], "t.ints": [1, -2, 3],
          "t.floats": [0.5, 1.5], "t.bools": [True, False], "t.n": 7, "t.s": "日本"})
    g = read_gguf(str(f))
    assert g.metadata["t.strings"] == ["a", "bé", ""] and g.metadata["t.ints"] == [1, -2, 3]
    assert g.metadata["t.floats"] == [0.5, 1.5] and g.metadata["t.bools"] == [True, False]
    assert (g.metadata["t.n"], g.metadata["t.s"], g.metadata["general.architecture"]) == (7, "日本", "llama")
    w, h = g.tensors
    assert (w.name, w.shape, w.data.shape) == ("w", (4, 3), (3, 4)) and np.array_equal(w.data, x)
    assert h.data.dtype == np.float16 and h.data.tolist() == [1.0] * 5
    assert read_gguf(str(f), tensors=False).tensors == ()


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"GGML" + b[4:], "no GGUF magic"),
    (lambda b: b[:4] + struct.pack("<I", 9) + b[8:], "GGUF version 9"),
    (lambda b: b[:60], "ends inside a field"),
    (lambda b: b[:-8], "run past the end of the file"),
    (lambda b: b[:16] + struct.pack("<Q", 2**40) + b[24:], "ends inside a field|cannot fit|unknown value type"),
    (lambda b: b[:10], "too short"),
])
def test_malformed_files_raise_a_value_error_saying_what(tmp_path: Path, damage: object, message: str) -> None:
    good = tmp_path / "good.gguf"
    write(good, {"w": np.ones((4, 8), dtype=np.float32)}, **{"t.strings": ["x"] * 10})
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(good.read_bytes()))  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        read_gguf(str(bad))


def test_arrays_nested_past_the_stack_are_a_value_error(tmp_path: Path) -> None:
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9)
    f = tmp_path / "deep.gguf"
    f.write_bytes(header + struct.pack("<IQ", 9, 1) * 100_000 + struct.pack("<IQ", 4, 0))
    with pytest.raises(ValueError, match="nested too deeply"):
        read_gguf(str(f))
