"""The model families' kernels against their pure-torch twins, under triton's interpreter on CPU tensors:
sliding-window and soft-capped paged attention, QK-norm, (1 + w) RMSNorm, GeGLU, MoE routing and the fused MoE.

Buffers the kernels allocate come back NaN-filled (the `poison` fixture of tests/test_kernels.py), so an
element a kernel forgets to write shows up as a mismatch.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton (and the kernels, decorated at import) are imported

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.attention.base import AttentionMetadata  # noqa: E402
from engine.attention.torch_ref import TorchAttention, paged_attention_ref  # noqa: E402
from engine.attention.triton_backend import TritonAttention  # noqa: E402
from engine.kernels.activation import gelu_tanh_and_mul, gelu_tanh_and_mul_ref  # noqa: E402
from engine.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref  # noqa: E402
from engine.kernels.moe import fused_moe, fused_moe_ref, moe_route, moe_route_ref  # noqa: E402
from engine.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref  # noqa: E402
from engine.kernels.rmsnorm import (  # noqa: E402
    fused_add_rmsnorm,
    fused_add_rmsnorm_ref,
    qk_rms_norm,
    qk_rms_norm_ref,
)
from engine.models import ops  # noqa: E402
from tests.test_kernels import (  # noqa: E402, F401 - poison: the autouse NaN fixture
    TOL,
    Seq,
    block_tables,
    close,
    layer_cache,
    make_prefill,
    poison,
    seeded,
    step_meta,
)

# ------------------------------------------------------------------------------ sliding window and soft-cap

WINDOW_CASES = [
    # dtype, H, KVH, D, block_size, seq_lens, query_lens, window, softcap
    (torch.float32, 4, 2, 16, 4, [30, 9], [30, 9], 7, None),  # window inside the first key tile
    (torch.float32, 8, 2, 32, 8, [70, 12, 5], [20, 12, 1], 20, 5.0),  # cached prefix, a decode row, both
    (torch.float32, 4, 4, 16, 16, [90], [45], 33, None),  # window > BLOCK_N: unmasked tiles in the middle
    (torch.float32, 6, 2, 16, 5, [26, 40], [26, 3], 100, 2.0),  # window wider than the context
    (torch.bfloat16, 8, 2, 32, 8, [50, 17], [20, 17], 16, 30.0),
]


@pytest.mark.parametrize(("dtype", "H", "KVH", "D", "bs", "lens", "qlens", "window", "cap"), WINDOW_CASES)
def test_prefill_window_softcap_matches_twin(dtype: torch.dtype, H: int, KVH: int, D: int, bs: int, lens: list[int],
                                             qlens: list[int], window: int, cap: float | None) -> None:
    seeded(sum(lens) + window)
    q, cache, tables, qsl, seq_lens = make_prefill(dtype, H, KVH, D, bs, lens, qlens)
    kw = dict(window=window, softcap=cap)
    ref = paged_prefill_attention_ref(q, cache, tables, qsl, seq_lens, max(qlens), 0.3, **kw)
    for bm, bn in ((16, 16), (32, 32)):
        close(paged_prefill_attention(q, cache, tables, qsl, seq_lens, max(qlens), 0.3, block_m=bm, block_n=bn, **kw),
              ref, dtype)


@pytest.mark.parametrize(("dtype", "H", "KVH", "D", "bs", "lens", "qlens", "window", "cap"), WINDOW_CASES)
def test_decode_window_softcap_matches_twin(dtype: torch.dtype, H: int, KVH: int, D: int, bs: int, lens: list[int],
                                            qlens: list[int], window: int, cap: float | None) -> None:
    seeded(sum(lens) * 3 + window)
    tables = block_tables(lens, bs, num_blocks=sum(-(-n // bs) for n in lens) + 4)
    _, cache = layer_cache(int(tables.max()) + 3, bs, KVH, D, dtype)
    q = torch.randn(len(lens), H, D).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ref = paged_decode_attention_ref(q, cache, tables, seq_lens, 0.3, window=window, softcap=cap)
    for splits in (1, 3, None):
        close(paged_decode_attention(q, cache, tables, seq_lens, 0.3, splits, window=window, softcap=cap, block_n=16),
              ref, dtype)


def test_window_twins_agree_with_torch_reference() -> None:
    """The kernels' twins and engine.attention.torch_ref compute the same windowed, soft-capped attention."""
    seeded(11)
    lens, qlens = [33, 19], [12, 19]
    q, cache, tables, qsl, seq_lens = make_prefill(torch.float32, 8, 2, 16, 4, lens, qlens)
    meta = AttentionMetadata(qsl, seq_lens, tables, torch.zeros(0, dtype=torch.int64), max(qlens), max(lens),
                             qsl.tolist(), lens)
    for window, cap in ((6, None), (10, 4.0), (None, 4.0)):
        torch.testing.assert_close(
            paged_prefill_attention_ref(q, cache, tables, qsl, seq_lens, 19, 0.25, window=window, softcap=cap),
            paged_attention_ref(q, cache, meta, 0.25, window, cap), rtol=1e-5, atol=1e-5)
        qd = q[:2]
        meta_d = AttentionMetadata(torch.arange(3, dtype=torch.int32), seq_lens, tables,
                                   torch.zeros(0, dtype=torch.int64), 1, max(lens), [0, 1, 2], lens)
        torch.testing.assert_close(paged_decode_attention_ref(qd, cache, tables, seq_lens, 0.25, window=window,
                                                              softcap=cap),
                                   paged_attention_ref(qd, cache, meta_d, 0.25, window, cap), rtol=1e-5, atol=1e-5)


def test_blocks_before_the_window_are_never_read() -> None:
    """Block-table entries wholly before every query's window may name freed blocks: no backend reads them."""
    seeded(12)
    bs, window, lens, qlens = 4, 6, [40, 27], [5, 1]
    q, cache, tables, qsl, seq_lens = make_prefill(torch.float32, 4, 2, 16, bs, lens, qlens)
    ref = paged_prefill_attention_ref(q, cache, tables, qsl, seq_lens, 5, 0.3, window=window)
    for b, (n, qn) in enumerate(zip(lens, qlens, strict=True)):
        dead = (n - qn - window + 1) // bs  # blocks wholly before the first query's window
        tables[b, :dead] = 10**8  # far outside the cache: any read through them fails
    meta = AttentionMetadata(qsl, seq_lens, tables, torch.zeros(0, dtype=torch.int64), 5, max(lens), qsl.tolist(), lens)
    close(paged_prefill_attention(q, cache, tables, qsl, seq_lens, 5, 0.3, window=window, block_m=16, block_n=16),
          ref, torch.float32)
    close(paged_attention_ref(q, cache, meta, 0.3, window), ref, torch.float32)
    dec = paged_decode_attention(q[[4, 5]], cache, tables, seq_lens, 0.3, 2, window=window, block_n=16)
    close(dec, paged_decode_attention_ref(q[[4, 5]], cache, tables.clamp(max=cache.shape[0] - 1), seq_lens, 0.3,
                                          window=window), torch.float32)


@pytest.mark.parametrize(("window", "cap"), [(5, None), (9, 3.0), (None, 3.0)])
def test_backend_window_softcap_matches_torch_backend(window: int | None, cap: float | None) -> None:
    """Prefill, a chunked-prefill + decode mix and decode steps through both backends on one layer's view."""
    seeded(13)
    bs, KVH, H, D = 4, 2, 8, 16
    big = torch.randn(20, 2, 2, bs, KVH, D)
    big_ref = big.clone()
    perm = torch.randperm(20).tolist()
    seqs = [Seq(perm[0:8], 0), Seq(perm[8:13], 0)]
    triton_be, torch_be = TritonAttention(), TorchAttention()
    for new in ([11, 5], [9, 1], [1, 1], [1, 1]):
        meta = step_meta(seqs, new, bs)
        q, k, v = (torch.randn(sum(new), h, D) for h in (H, KVH, KVH))
        out = triton_be.forward(q, k, v, big[:, 1], meta, D**-0.5, window=window, softcap=cap)
        ref = torch_be.forward(q, k, v, big_ref[:, 1], meta, D**-0.5, window=window, softcap=cap)
        close(out, ref, torch.float32)


# --------------------------------------------------------------------------- norms and activation


@pytest.mark.parametrize(("dtype", "unit_offset"), [(torch.float32, False), (torch.float32, True),
                                                    (torch.bfloat16, False), (torch.bfloat16, True)])
def test_qk_rms_norm_matches_twin(dtype: torch.dtype, unit_offset: bool) -> None:
    seeded(14)
    T, H, KVH, D = 5, 6, 2, 32
    qkv = torch.randn(T, (H + 2 * KVH) * D).to(dtype)  # q and k are strided views of one projection
    q, k = qkv[:, : H * D].view(T, H, D), qkv[:, H * D : (H + KVH) * D].view(T, KVH, D)
    wq, wk = torch.randn(D).to(dtype), torch.randn(D).to(dtype)
    want_q, want_k = qk_rms_norm_ref(q, k, wq, wk, 1e-6, unit_offset)
    cpu_q, cpu_k = ops.qk_rms_norm(q, k, wq, wk, 1e-6, unit_offset)  # the engine's CPU path: transformers' norms
    torch.testing.assert_close(cpu_q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(cpu_k, want_k, rtol=0, atol=0)
    v_before = qkv[:, (H + KVH) * D :].clone()
    qk_rms_norm(q, k, wq, wk, 1e-6, unit_offset)
    close(q, want_q, dtype)
    close(k, want_k, dtype)
    assert torch.equal(qkv[:, (H + KVH) * D :], v_before), "QK-norm wrote outside q and k"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_offset_rmsnorm_matches_twin_and_gemma(dtype: torch.dtype) -> None:
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    seeded(15)
    x, r, w = torch.randn(4, 48).to(dtype), torch.randn(4, 48).to(dtype), torch.randn(48).to(dtype)
    out, h = fused_add_rmsnorm(x, r, w, 1e-6, unit_offset=True)
    out_ref, h_ref = fused_add_rmsnorm_ref(x, r, w, 1e-6, unit_offset=True)
    assert out.dtype == dtype
    close(out, out_ref, dtype)
    hf = Gemma2RMSNorm(48, 1e-6).to(dtype)
    hf.weight.data.copy_(w)
    with torch.no_grad():
        torch.testing.assert_close(out_ref, hf(h_ref), rtol=0, atol=0)
        torch.testing.assert_close(ops.add_rms_norm(x, r, w, 1e-6, unit_offset=True)[0], out_ref, rtol=0, atol=0)


@pytest.mark.parametrize(("T", "inter"), [(1, 8), (7, 100), (3, 1500)])
def test_gelu_tanh_and_mul_matches_twin(T: int, inter: int) -> None:
    x = torch.randn(T, 2 * inter) * 3
    torch.testing.assert_close(gelu_tanh_and_mul(x), gelu_tanh_and_mul_ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gelu_tanh_and_mul_ref(x), ops.act_and_mul(x, "gelu_tanh"), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ MoE

MOE_CASES = [
    # T, E, k, H, I, dtype, activation
    (5, 8, 2, 32, 48, torch.float32, "silu"),
    (1, 16, 8, 64, 32, torch.float32, "silu"),  # a batch-1 decode step: every pair its own expert block
    (40, 6, 2, 32, 16, torch.float32, "gelu_tanh"),  # E not a power of two; blocks of 16 rows
    (3, 4, 1, 16, 16, torch.float32, "silu"),
    (9, 60, 6, 32, 16, torch.float32, "silu"),  # top-6 of 60 (not powers of two)
    (24, 4, 4, 32, 32, torch.bfloat16, "silu"),
]


@pytest.mark.parametrize(("T", "E", "k", "H", "inter", "dtype", "act"), MOE_CASES)
def test_moe_route_and_fused_moe_match_twins(T: int, E: int, k: int, H: int, inter: int, dtype: torch.dtype,
                                             act: str) -> None:
    seeded(T * E + k)
    logits = torch.randn(T, E).to(dtype)
    for normalize in (True, False):
        weights, ids = moe_route(logits, k, normalize)
        want_w, want_ids = moe_route_ref(logits, k, normalize)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-6)
    x = torch.randn(T, H).to(dtype)
    w13, w2 = (torch.randn(E, 2 * inter, H) / H**0.5).to(dtype), (torch.randn(E, H, inter) / inter**0.5).to(dtype)
    out, want = fused_moe(x, w13, w2, weights, ids, act), fused_moe_ref(x, w13, w2, weights, ids, act)
    if dtype == torch.bfloat16:  # the interpreter truncates the kernel's two intermediate roundings to bf16
        assert not out.isnan().any()
        torch.testing.assert_close(out.float(), want.float(), rtol=0.05, atol=0.05)
        return
    close(out, want, dtype)
    # and the engine's CPU path (transformers' per-expert loop) computes the same
    torch.testing.assert_close(out, ops.fused_moe(x, w13, w2, weights, ids, act), rtol=TOL[dtype][0], atol=TOL[dtype][1])


@pytest.mark.parametrize("config", [(16, 16, 16, 1), (32, 32, 16, 2), (64, 16, 32, 4)])
def test_fused_moe_tile_configs_agree(config: tuple[int, int, int, int]) -> None:
    """Any tile choice (rows per expert block, columns, K step) computes the same sums."""
    seeded(16)
    T, E, k, H, inter = 37, 5, 2, 48, 40
    x = torch.randn(T, H)
    weights, ids = moe_route(torch.randn(T, E), k, True)
    w13, w2 = torch.randn(E, 2 * inter, H) / H**0.5, torch.randn(E, H, inter) / inter**0.5
    close(fused_moe(x, w13, w2, weights, ids, "silu", config=config), fused_moe_ref(x, w13, w2, weights, ids),
          torch.float32)


def test_fused_moe_skewed_routing_and_empty_batch() -> None:
    """Every token to the same two experts (one block run, all others empty), and zero tokens."""
    seeded(17)
    T, E, H, inter = 21, 8, 16, 16
    x, w13, w2 = torch.randn(T, H), torch.randn(E, 2 * inter, H) / 4, torch.randn(E, H, inter) / 4
    ids = torch.tensor([[5, 2]] * T)
    weights = torch.rand(T, 2)
    close(fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids), torch.float32)
    assert fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, H)


# ------------------------------------------------------------------------------------------- CUDA-graph layouts


@pytest.mark.parametrize("per_token_rows", [64, 0], ids=["per-token", "per-sequence"])
def test_graph_layouts_with_windows_softcap_and_experts(per_token_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The padded (bucket, q) batches CUDA graphs run give the eager logits and KV for a model with a sliding
    layer, soft-capped scores and MoE layers (off CUDA the runner computes the captured shapes eagerly)."""
    from engine.config import CacheConfig, EngineConfig, ModelConfig, MoEConfig
    from engine.model_runner import ModelRunner
    from tests.test_cuda_graph import BS, BatchSeq, run_both

    monkeypatch.setattr("engine.cuda_graph.PER_TOKEN_MAX_ROWS", per_token_rows)
    shape = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        max_position_embeddings=64, architecture="mixtral", sliding_window=5, eos_token_ids=(0,),
                        layer_types=("sliding_attention", "full_attention"), attn_logit_softcap=4.0,
                        moe=MoEConfig(4, 2, 16))
    runner = ModelRunner(EngineConfig(model="tiny-moe", load_format="dummy", dummy_model=shape,
                                      attention_backend="triton", cache=CacheConfig(num_blocks=48, block_size=BS)),
                         torch.device("cpu"), num_blocks=48, max_model_len=64)
    decode = [BatchSeq("a", 5, [11], 1), BatchSeq("b", 13, [12], 1), BatchSeq("c", 2, [13], 1)]
    verify = [BatchSeq("a", 16, [11, 20, 21], 3), BatchSeq("b", 13, [12, 22], 2), BatchSeq("c", 3, [13], 1)]
    for seqs, q in ((decode, 1), (verify, 3)):
        eager, padded, same_kv = run_both(runner, seqs, q=q)
        torch.testing.assert_close(padded, eager, rtol=1e-4, atol=1e-4)
        assert same_kv, "padding tokens wrote KV"
