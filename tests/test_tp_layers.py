"""Tensor-parallel pieces in one process: the parallel layers against their torch twins (real gloo groups, one
thread per rank), each rank's checkpoint slices tiling the whole tensors, loaders reading only a rank's slices, the
step message, and the KV head plans between workers of different sizes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.batch import BatchSeq
from engine.config import ConfigError, EngineConfig, ModelConfig
from engine.loader import iter_weights, load_model_config, resolve_source, smollm2_gguf_path
from engine.models import registry
from engine.models.parallel import (
    ColumnParallelLinear,
    Part,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_divisible,
    column_parallel_ref,
    even_split,
    gather_logits,
    kv_head_range,
    row_parallel_ref,
    vocab_parallel_embedding_ref,
    vocab_parallel_logits_ref,
)
from engine.parallel import step as msg
from engine.parallel.group import TPGroup, building, connect, host_store
from engine.parallel.kv_heads import KVHeadLayout, head_runs, plan_head_copies

SMOL = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=2, num_heads=9,
                   num_kv_heads=3, tie_word_embeddings=True)
TINY = ModelConfig(vocab_size=384, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=8, num_kv_heads=2)


def on_ranks(size: int, fn: Callable[[TPGroup], Any]) -> list[Any]:
    """fn(group) on `size` threads, each a rank of one real gloo group; results in rank order."""
    store = host_store(size, 30)
    out: list[Any] = [None] * size
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            group = connect(rank, size, store.port, "gloo", 30, torch.device("cpu"), store=store if rank == 0 else None)
            out[rank] = fn(group)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out


def test_torch_twins_equal_the_whole_layers() -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 24), torch.randn(18, 24), torch.randn(18)
    for size in (1, 2, 3):
        torch.testing.assert_close(torch.cat(column_parallel_ref(x, w, b, size), -1), F.linear(x, w, b))
        torch.testing.assert_close(row_parallel_ref(x, w, b, size), F.linear(x, w, b))
    table, ids = torch.randn(10, 4), torch.tensor([0, 3, 9, 4, 7])
    for size in (1, 3, 4):  # 10 rows over 3 or 4 ranks: the last rank holds padding
        torch.testing.assert_close(vocab_parallel_embedding_ref(ids, table, size), F.embedding(ids, table))
        torch.testing.assert_close(vocab_parallel_logits_ref(x[:, :4], table, size)[:, :10], F.linear(x[:, :4], table))


@pytest.mark.parametrize("size", [2, 3])
def test_parallel_layers_on_real_ranks_equal_their_twins(size: int) -> None:
    torch.manual_seed(1)
    x, w_col, w_row, b = torch.randn(4, 12), torch.randn(9, 12), torch.randn(7, 12), torch.randn(7)
    table, ids = torch.randn(11, 12), torch.tensor([0, 5, 10, 3])

    def rank_fn(g: TPGroup) -> tuple[torch.Tensor, ...]:
        with building(g):
            a, c = even_split(9, g.rank, size)
            col = ColumnParallelLinear(12, [Part(9, a, c)], bias=False)
            row = RowParallelLinear(12, 7, bias=True)
            emb = VocabParallelEmbedding(11, 12)
        with torch.no_grad():
            col.weight.copy_(w_col[a:c])
            row.weight.copy_(row.shard.take(w_row) if row.shard else w_row)
            row.bias.copy_(b)
            emb.weight[: emb.num_real].copy_(table[emb.start : emb.start + emb.num_real])
            emb.zero_padding()
            logits = gather_logits(F.linear(x, emb.weight), 11, g)
            return col(x), row(row.shard.take(x) if row.shard else x), emb(ids), logits

    outs = on_ranks(size, rank_fn)
    for r, (col, row, emb, logits) in enumerate(outs):
        torch.testing.assert_close(col, column_parallel_ref(x, w_col, None, size)[r])
        torch.testing.assert_close(row, row_parallel_ref(x, w_row, b, size))
        assert torch.equal(emb, F.embedding(ids, table)), "one real row plus zeros is exact"
        torch.testing.assert_close(logits, F.linear(x, table))
        assert torch.equal(row, outs[0][1]) and torch.equal(logits, outs[0][3]), "every rank ends with the same bits"


def test_kv_heads_shard_or_replicate() -> None:
    assert [kv_head_range(3, r, 3) for r in range(3)] == [(0, 1), (1, 2), (2, 3)]
    assert [kv_head_range(2, r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [kv_head_range(8, r, 2) for r in range(2)] == [(0, 4), (4, 8)]
    with pytest.raises(ConfigError, match="num_heads 9.*num_kv_heads 3"):
        check_divisible(SMOL, 2)
    check_divisible(SMOL, 3)
    check_divisible(TINY, 4)


@pytest.mark.parametrize(("cfg", "size"), [(SMOL, 3), (TINY, 2), (TINY, 4)])
def test_each_ranks_slices_tile_every_checkpoint_tensor(cfg: ModelConfig, size: int) -> None:
    """Per checkpoint tensor, the ranks' shards cover it (exactly once, or whole KV heads replicated)."""
    whole = registry.layout(cfg)
    layouts = [registry.layout(cfg, r, size) for r in range(size)]
    for name, slot in whole.items():
        shards = [lay[name].shard for lay in layouts]
        assert all(lay[name].shape == slot.shape for lay in layouts), "a slot names the whole checkpoint shape"
        if shards[0] is None:
            assert all(s is None for s in shards), name  # replicated: norms, the router
            continue
        covered = sorted({(s.start, s.stop) for s in shards if s is not None})
        assert covered[0][0] == 0 and covered[-1][1] == slot.shape[shards[0].dim], name
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False)), name


def test_loaders_read_only_a_ranks_slices(tiny_llama_dir: str) -> None:
    cfg = load_model_config("hf", tiny_llama_dir)
    lay = registry.layout(cfg, 1, 2)
    shards = {n: s.shard for n, s in lay.items() if s.shard is not None}
    whole = dict(iter_weights("hf", tiny_llama_dir, cfg, torch.float32))
    part = dict(iter_weights("hf", tiny_llama_dir, cfg, torch.float32, shards))
    for name, t in whole.items():
        expect = shards[name].take(t) if name in shards else t
        assert torch.equal(part[name], expect), name
    assert part["model.layers.0.self_attn.o_proj.weight"].shape == (64, 32)


@pytest.mark.slow
def test_gguf_loader_slices_after_dequantizing() -> None:
    path = smollm2_gguf_path()
    cfg = load_model_config(*resolve_source("smollm2", "auto"))
    lay = registry.layout(cfg, 2, 3)
    shards = {n: s.shard for n, s in lay.items()
              if s.shard is not None and (".layers.1." in n or n.startswith("model.embed"))}
    names = list(shards)
    whole = {n: t for n, t in iter_weights("gguf", path, cfg, torch.float32) if n in names}
    part = {n: t for n, t in iter_weights("gguf", path, cfg, torch.float32, shards) if n in names}
    for name in names:
        assert torch.equal(part[name], shards[name].take(whole[name])), name


def test_step_message_round_trip() -> None:
    seqs = [BatchSeq("a", 0, [5, 6, 7], 1), BatchSeq("b", 40, [9], 1), BatchSeq("c", 17, [1, 2], 0)]
    tables = np.array([[3, 0, 0], [4, 8, 9], [1, 2, 0]], np.int32)
    buf = msg.encode_step(seqs, tables, None, 2, 1)
    assert len(buf) == 8 * (8 + 9 + 6) + 4 * 9, "8 bytes a token and a sequence field, 4 a table entry"
    step = msg.decode_step(buf, 16)
    assert [(s.start, s.token_ids, s.num_logits) for s in step.seqs] == [(s.start, s.token_ids, s.num_logits)
                                                                       for s in seqs]
    assert np.array_equal(step.tables.gather(["x", "y", "z"]), tables) and step.tables.block_size == 16
    assert (step.q, step.num_layers, step.n_device_ids) == (None, 2, 1)
    assert msg.decode_step(msg.encode_step(seqs, tables, 4, None, 0), 16).q == 4
    ctl = msg.encode_control(msg.COPY, [(1, 2)])
    assert msg.message_kind(ctl) == msg.COPY and msg.decode_control(ctl) == [(1, 2)]


def layout(heads: int, size: int) -> KVHeadLayout:
    return KVHeadLayout.of(heads, size, num_layers=3, block_size=4, head_dim=2, dtype="float32", num_blocks=5)


@pytest.mark.parametrize(("heads", "src", "dst"), [(3, 1, 3), (3, 3, 1), (2, 2, 4), (2, 4, 2), (2, 4, 1), (8, 2, 4),
                                                   (8, 4, 2), (3, 3, 3), (2, 4, 4)])
def test_head_plans_fill_every_decode_rank_from_the_prefill_ranks(heads: int, src: int, dst: int) -> None:
    """Move a random KV cache split as `src` into one split as `dst` by the plan: each decode shard gets exactly
    its heads of the whole cache."""
    torch.manual_seed(heads * 100 + src * 10 + dst)
    s_lay, d_lay = layout(heads, src), layout(heads, dst)
    whole = torch.randn(5, 3, 2, 4, heads, 2)
    src_shards = [whole[..., a:b, :].contiguous() for a, b in s_lay.heads]
    dst_shards = [torch.full(d_lay.shard_shape(r), float("nan")) for r in range(dst)]
    plan = plan_head_copies(s_lay, d_lay)
    for c in plan:
        dst_shards[c.dst_rank][..., c.dst_heads[0] : c.dst_heads[1], :] = \
            src_shards[c.src_rank][..., c.src_heads[0] : c.src_heads[1], :]
    for r, (a, b) in enumerate(d_lay.heads):
        assert torch.equal(dst_shards[r], whole[..., a:b, :]), f"decode rank {r}"
    if src == dst:
        assert [(c.src_rank, c.dst_rank, c.src_heads) for c in plan] == [(r, r, (0, s_lay.local_heads(r)))
                                                                         for r in range(src)]
    if (heads, src, dst) == (2, 4, 2):  # replicated prefill heads: decode ranks spread over the replicas
        assert [c.src_rank for c in plan] == [0, 3]


def test_head_runs_address_a_head_range_in_a_block() -> None:
    lay = layout(4, 1)
    block = torch.arange(3 * 2 * 4 * 4 * 2, dtype=torch.float32).view(3, 2, 4, 4, 2)
    raw = block.view(-1).numpy().view(np.uint8)
    for heads, layers in [((1, 3), (1, 3)), ((0, 4), (0, 3)), ((0, 4), (2, 3)), ((3, 4), None)]:
        runs = head_runs(lay, 0, heads, layers)
        got = np.concatenate([raw[runs.offset + i * runs.stride : runs.offset + i * runs.stride + runs.length]
                              for i in range(runs.count)]).view(np.float32)
        l0, l1 = layers or (0, 3)
        assert np.array_equal(got, block[l0:l1, :, :, heads[0] : heads[1]].reshape(-1).numpy())
    assert head_runs(lay, 0, (0, 4)).count == 1, "whole-width heads of every layer: one run"
    with pytest.raises(ValueError, match="outside"):
        head_runs(lay, 0, (2, 5))


def test_layout_travels_as_plain_fields() -> None:
    lay = layout(2, 4)
    assert KVHeadLayout.from_dict(lay.to_dict()) == lay and lay.heads == ((0, 1), (0, 1), (1, 2), (1, 2))
    with pytest.raises(ValueError, match="cannot map"):
        plan_head_copies(lay, KVHeadLayout.of(2, 2, 3, 8, 2, "float32", 5))
    with pytest.raises(ValueError, match="do not cover"):
        KVHeadLayout(3, ((0, 1), (2, 3)), 3, 4, 2, "float32", 5)


def test_config_takes_the_parallel_size() -> None:
    cfg = EngineConfig.from_dict({"tensor_parallel_size": 3, "parallel": {"backend": "gloo", "collective_timeout_s": 5}})
    assert cfg.tensor_parallel_size == 3 and cfg.parallel.collective_timeout_s == 5
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="parallel.backend"):
        EngineConfig.from_dict({"parallel": {"backend": "mpi"}})
