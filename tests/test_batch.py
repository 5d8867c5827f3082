"""A step's batch layout and the engine's start-up warm-up: a batch's inputs never depend on its shape in the ways
Triton specialises a kernel on (pointer alignment, an int being 1 or a multiple of 16), and the warm-up compiles
the eager path's kernels before the first request, writing nothing but block 0."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.batch import TABLE_COLS, BatchSeq, build_batch
from engine.config import CacheConfig, EngineConfig, ModelConfig, MoEConfig
from engine.engine import LLMEngine
from engine.kernels.moe import _block_m, block_m_classes
from engine.kv_cache_manager import KVCacheManager
from engine.model_shard import ModelShard
from engine.request import SamplingParams

TINY = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=256, eos_token_ids=(0,), bos_token_id=1)
BS = 4

seq_shapes = st.lists(st.tuples(st.integers(0, 40), st.integers(1, 40), st.integers(0, 3)), min_size=1, max_size=7)


@settings(max_examples=60, deadline=None)
@given(seq_shapes)
def test_parts_aligned_and_tables_padded(shapes: list[tuple[int, int, int]]) -> None:
    kv = KVCacheManager(256, BS)
    kv.allocate("other", 9)  # rows and blocks not at zero
    seqs = []
    for i, (start, n, logits) in enumerate(shapes):
        seqs.append(BatchSeq(f"r{i}", start, [(7 * i + j) % 97 for j in range(n)], min(logits, n)))
        assert kv.allocate(f"r{i}", start + n)
    ids, pos, meta, rows = build_batch(seqs, kv, torch.device("cpu"))
    parts = {"ids": ids, "positions": pos, "slots": meta.slot_mapping, "logit rows": rows,
             "query_start_loc": meta.query_start_loc, "seq_lens": meta.seq_lens, "block_tables": meta.block_tables}
    for name, t in parts.items():
        assert t.data_ptr() % 16 == 0, f"{name} starts {t.data_ptr() % 16} bytes off a 16-byte boundary"
    assert meta.block_tables.shape[1] % TABLE_COLS == 0 and meta.block_tables.stride(0) % TABLE_COLS == 0
    # the contents are those of the unpadded layout
    table = kv.table_array.gather([s.request_id for s in seqs])
    assert np.array_equal(meta.block_tables[:, : table.shape[1]].numpy(), table)
    assert not meta.block_tables[:, table.shape[1] :].any()
    want_pos = [s.start + j for s in seqs for j in range(len(s.token_ids))]
    assert pos.tolist() == want_pos and ids.tolist() == [t for s in seqs for t in s.token_ids]
    rows_of = [i for i, s in enumerate(seqs) for _ in s.token_ids]
    assert meta.slot_mapping.tolist() == [int(table[r, p // BS]) * BS + p % BS for r, p in zip(rows_of, want_pos,
                                                                                                strict=True)]
    lens = [len(s.token_ids) for s in seqs]
    assert meta.query_start_loc.tolist() == np.concatenate([[0], np.cumsum(lens)]).tolist()
    assert meta.seq_lens.tolist() == [s.start + len(s.token_ids) for s in seqs]
    ends = np.cumsum(lens)
    assert rows.tolist() == [int(e) - k + j for e, s in zip(ends, seqs, strict=True) for k in [s.num_logits]
                             for j in range(k)]


def shard() -> ModelShard:
    cfg = EngineConfig(model="tiny", load_format="dummy", dummy_model=TINY, dtype="float32", device="cpu",
                       attention_backend="torch", cache=CacheConfig(num_blocks=16, block_size=BS))
    return ModelShard(cfg, torch.device("cpu"), num_blocks=16, max_model_len=256)


def test_warm_up_writes_block_zero_only() -> None:
    s = shard()
    assert not s.jit_kernels  # nothing compiles at first launch on the CPU: no warm-up at start there
    s.kv_cache.normal_()
    before = s.kv_cache.clone()
    s.warm_up()
    assert s.warmed_up
    assert torch.equal(s.kv_cache[1:], before[1:])
    assert not torch.equal(s.kv_cache[0], before[0])


def test_warm_up_leaves_outputs_alone() -> None:
    cfg = EngineConfig(model="tiny", load_format="dummy", dummy_model=TINY, dtype="float32", device="cpu",
                       attention_backend="torch", cache=CacheConfig(num_blocks=64, block_size=BS))
    plain, warmed = LLMEngine(cfg), LLMEngine(cfg)
    warmed._runner.shard.warm_up()  # as a CUDA engine does at start
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = {"a": [3, 4, 5, 6, 7, 8, 9, 10, 11], "b": [20, 21], "c": list(range(30, 60))}

    def run(engine: LLMEngine) -> dict[str, list[int]]:
        for rid, prompt in prompts.items():
            engine.add_request(rid, prompt, p)
        out: dict[str, list[int]] = {rid: [] for rid in prompts}
        while engine.has_unfinished():
            for so in engine.step():
                out[so.request_id].extend(so.new_token_ids)
        return out

    assert run(warmed) == run(plain)


def _triton_variants() -> dict[str, int]:
    """Compiled variants of each of the engine's Triton kernels in this process."""
    from triton.runtime.jit import JITFunction

    from engine.kernels import activation, decode_attention, kv_write, moe, prefill_attention, rmsnorm, rotary

    out = {}
    for mod in (activation, decode_attention, kv_write, moe, prefill_attention, rmsnorm, rotary):
        for name, fn in vars(mod).items():
            if isinstance(fn, JITFunction):
                out[f"{mod.__name__}.{name}"] = sum(len(c[0]) for c in fn.device_caches.values())
    return out


def test_warm_up_covers_a_moe_models_block_sizes() -> None:
    moe = dataclasses.replace(TINY, architecture="mixtral", moe=MoEConfig(8, 2, 16))
    cfg = EngineConfig(model="tiny", load_format="dummy", dummy_model=moe, dtype="float32", device="cpu",
                       attention_backend="torch", cache=CacheConfig(num_blocks=16, block_size=BS))
    s = ModelShard(cfg, torch.device("cpu"), num_blocks=16, max_model_len=256)
    seen: list[int] = []
    real = s.logits
    s.logits = lambda seqs, kv, *a: seen.append(sum(len(q.token_ids) for q in seqs)) or real(seqs, kv, *a)  # type: ignore[method-assign]
    s.warm_up()
    assert sorted({_block_m(n * 2, 8) for n in seen}) == [16, 32, 64]
    assert block_m_classes(8, 2) == [4, 68, 132]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("moe", [None, MoEConfig(8, 2, 16)], ids=["dense", "moe"])
def test_no_kernel_compiles_after_start(moe: MoEConfig | None) -> None:
    """Prompts of every length class and batches of any size run on the kernels the start-up compiled."""
    model = dataclasses.replace(TINY, architecture="mixtral" if moe else "llama", moe=moe)
    cfg = EngineConfig(model="tiny", load_format="dummy", dummy_model=model, dtype="bfloat16", device="cuda",
                       cache=CacheConfig(num_blocks=256, block_size=16))
    engine = LLMEngine(cfg)
    started = _triton_variants()
    assert started.get("engine.kernels.prefill_attention._prefill_kernel")
    p = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    for wave, lengths in enumerate([[1], [16], [17], [5, 33, 100], [200, 2, 7, 64, 31], [48] * 3, [150, 90]]):
        for i, n in enumerate(lengths):
            engine.add_request(f"w{wave}-{i}", [(5 + j) % 97 for j in range(n)], p)
        while engine.has_unfinished():
            engine.step()
    assert _triton_variants() == started
