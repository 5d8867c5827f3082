"""Write a GGUF holding only another GGUF's metadata (its tokenizer, chat template, architecture keys), no tensors.

    python scripts/tokenizer_gguf.py SRC.gguf DST.gguf

The packaged SmolLM2 GGUF is 98 MB; its metadata alone is 1.7 MB. GPU benchmarks that serve dummy Llama-3-8B
weights only need a tokenizer for the router (`benchmarks/kv_streaming.py --device cuda --tokenizer DST.gguf`),
and a 1.7 MB file travels to a lent GPU machine where the whole GGUF exceeds what one call may carry.
"""

from __future__ import annotations

import struct
import sys

from engine.gguf_file import read_gguf


def strip_tensors(src: str, dst: str) -> int:
    """Copy the header and key-value section of `src` with a tensor count of 0; returns the bytes written."""
    end = read_gguf(src, tensors=False).metadata_end
    with open(src, "rb") as f:
        data = bytearray(f.read(end))
    struct.pack_into("<Q", data, 8, 0)  # header: magic (4), version (u32), tensor count (u64), key-value count (u64)
    with open(dst, "wb") as f:
        f.write(data)
    return end


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    try:
        written = strip_tensors(sys.argv[1], sys.argv[2])
    except (OSError, ValueError) as e:
        sys.exit(f"{sys.argv[1]}: not a readable GGUF file ({e})")
    print(f"wrote {written:,} bytes to {sys.argv[2]}")
