"""Triton kernels against their pure-torch twins, run by triton's interpreter on CPU tensors.

Every buffer the kernels allocate (outputs, split partials) comes back NaN-filled here (see `poison`), and
caches start NaN-filled, so an element a kernel forgets to write shows up as a mismatch. Shapes are tiny: the
interpreter runs each program in Python.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton (and the kernels, decorated at import) are imported

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401 - no skip: a missing triton must fail these tests

from engine.attention.base import AttentionMetadata, get_attention_backend  # noqa: E402
from engine.attention.torch_ref import TorchAttention  # noqa: E402
from engine.attention.triton_backend import TritonAttention  # noqa: E402
from engine.kernels import (  # noqa: E402
    fused_add_rmsnorm,
    fused_add_rmsnorm_ref,
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
    paged_prefill_attention_ref,
    write_kv,
    write_kv_ref,
)

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
_empty, _empty_like = torch.empty, torch.empty_like


@pytest.fixture(autouse=True)
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh float buffers (kernel outputs and partials) are NaN instead of whatever memory held."""

    def fill(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(_empty_like(*a, **kw)))


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not actual.isnan().any(), "kernel left NaN (unwritten or bad softmax) elements"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def layer_cache(num_blocks: int, block_size: int, kvh: int, d: int, dtype: torch.dtype, num_layers: int = 3,
                layer: int = 1, fill: str = "randn") -> tuple[torch.Tensor, torch.Tensor]:
    """A block-major cache [blocks, layers, 2, bs, kvh, d] and its (strided) view of one layer."""
    shape = (num_blocks, num_layers, 2, block_size, kvh, d)
    big = torch.randn(shape).to(dtype) if fill == "randn" else torch.full(shape, float("nan"), dtype=dtype)
    view = big[:, layer]
    assert not view.is_contiguous()
    return big, view


def block_tables(seq_lens: list[int], block_size: int, num_blocks: int, extra_cols: int = 1) -> torch.Tensor:
    """Each sequence gets distinct, shuffled blocks; rows padded with 0 (as the model runner pads)."""
    need = [-(-n // block_size) for n in seq_lens]
    assert sum(need) <= num_blocks
    perm = torch.randperm(num_blocks).tolist()
    width = max(need, default=0) + extra_cols
    rows, at = [], 0
    for n in need:
        rows.append(perm[at : at + n] + [0] * (width - n))
        at += n
    return torch.tensor(rows, dtype=torch.int32).view(len(seq_lens), width)


def seeded(seed: int) -> None:
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------- write_kv


@pytest.mark.parametrize(
    ("T", "kvh", "d", "bs", "src_dtype", "cache_dtype"),
    [
        (7, 2, 16, 4, torch.float32, torch.float32),
        (13, 1, 32, 16, torch.float32, torch.bfloat16),
        (5, 4, 64, 8, torch.bfloat16, torch.bfloat16),
        (9, 8, 16, 3, torch.float16, torch.float32),
    ],
)
def test_write_kv_matches_twin(T: int, kvh: int, d: int, bs: int, src_dtype: torch.dtype,
                               cache_dtype: torch.dtype) -> None:
    seeded(T * 100 + d)
    num_blocks = 2 + -(-T // bs) * 2
    big, view = layer_cache(num_blocks, bs, kvh, d, cache_dtype, fill="nan")
    big_ref = big.clone()
    slots = torch.randperm(num_blocks * bs)[:T]
    slots[torch.rand(T) < 0.3] = -1  # padding tokens
    # k/v as non-contiguous slices of a fused projection output
    kv = torch.randn(T, 2, kvh, d + 3).to(src_dtype)
    k, v = kv[:, 0, :, :d], kv[:, 1, :, 1 : d + 1]
    write_kv(k, v, view, slots)
    write_kv_ref(k, v, big_ref[:, 1], slots)
    # The interpreter truncates fp32 -> bf16 (a GPU rounds to nearest even, as torch does): one ulp allowed there.
    narrowing = cache_dtype.itemsize < src_dtype.itemsize
    torch.testing.assert_close(big, big_ref, rtol=2**-7 if narrowing else 0, atol=0, equal_nan=True)
    written = slots[slots >= 0]
    assert not big[:, 1].flatten(2, 2)[written // bs, :, written % bs].isnan().any()
    assert big[:, 0].isnan().all() and big[:, 2].isnan().all(), "other layers touched"


def test_write_kv_int32_slots_and_empty() -> None:
    seeded(1)
    big, view = layer_cache(4, 4, 2, 16, torch.float32, fill="nan")
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    write_kv(k, v, view, torch.tensor([5, -1, 0], dtype=torch.int32))
    torch.testing.assert_close(view[1, 0, 1], k[0])
    torch.testing.assert_close(view[0, 1, 0], v[2])
    write_kv(k[:0], v[:0], view, torch.zeros(0, dtype=torch.int64))
    assert view.isnan().sum() == view.numel() - 2 * 2 * 2 * 16


# ------------------------------------------------------------------------------------------------ decode attention

DECODE_CASES = [
    # dtype, num_heads, kv_heads, head_dim, block_size, seq_lens
    (torch.float32, 4, 4, 16, 4, [1, 7, 19]),
    (torch.float32, 8, 4, 32, 8, [0, 33, 5, 16]),
    (torch.float32, 8, 2, 64, 16, [45, 0]),
    (torch.float32, 6, 2, 16, 5, [23, 11]),  # GQA 3 (not a power of two), odd block size
    (torch.bfloat16, 8, 2, 32, 16, [40, 3, 17]),
    (torch.float16, 4, 2, 16, 8, [29, 1]),
]


@pytest.mark.parametrize(("dtype", "H", "KVH", "D", "bs", "lens"), DECODE_CASES)
def test_decode_matches_twin_and_splits_agree(dtype: torch.dtype, H: int, KVH: int, D: int, bs: int,
                                              lens: list[int]) -> None:
    seeded(sum(lens) + H * D)
    tables = block_tables(lens, bs, num_blocks=sum(-(-n // bs) for n in lens) + 4)
    _, cache = layer_cache(int(tables.max()) + 3, bs, KVH, D, dtype)
    q = torch.randn(len(lens), H, D).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = D**-0.5
    ref = paged_decode_attention_ref(q, cache, tables, seq_lens, scale)
    outs = {}
    for splits in (1, 3, None):
        outs[splits] = paged_decode_attention(q, cache, tables, seq_lens, scale, splits, block_n=16)
        close(outs[splits], ref, dtype)
    # a split count beyond the number of key tiles leaves empty partitions; they must merge away cleanly
    outs[8] = paged_decode_attention(q, cache, tables, seq_lens, scale, 8, block_n=16, max_seq_len=max(lens))
    close(outs[8], ref, dtype)
    split_tol = 1e-5 if dtype == torch.float32 else TOL[dtype][0]
    for s in (3, 8):
        torch.testing.assert_close(outs[s].float(), outs[1].float(), rtol=split_tol, atol=split_tol)
    for b, n in enumerate(lens):
        if n == 0:
            assert (outs[1][b] == 0).all() and (outs[3][b] == 0).all()


def test_decode_empty_rows_never_touch_their_table() -> None:
    """seq_len 0 rows (CUDA-graph padding) may have garbage block tables: nothing may be read through them."""
    seeded(3)
    _, cache = layer_cache(6, 4, 2, 16, torch.float32)
    tables = torch.tensor([[1, 2, 5], [10**8, -(10**8), 10**9]], dtype=torch.int32)
    seq_lens = torch.tensor([9, 0], dtype=torch.int32)
    q = torch.randn(2, 4, 16)
    ref = paged_decode_attention_ref(q, cache, tables, seq_lens, 0.25)
    for splits in (1, 4):
        out = paged_decode_attention(q, cache, tables, seq_lens, 0.25, splits, block_n=16)
        close(out, ref, torch.float32)
        assert (out[1] == 0).all()


def test_decode_default_tile_and_long_context() -> None:
    seeded(4)
    lens = [300, 129, 64]
    tables = block_tables(lens, 16, num_blocks=40)
    _, cache = layer_cache(40, 16, 2, 32, torch.float32)
    q = torch.randn(3, 8, 32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ref = paged_decode_attention_ref(q, cache, tables, seq_lens, 0.2)
    close(paged_decode_attention(q, cache, tables, seq_lens, 0.2), ref, torch.float32)  # auto splits, BLOCK_N 64
    close(paged_decode_attention(q, cache, tables, seq_lens, 0.2, 1), ref, torch.float32)


# ----------------------------------------------------------------------------------------------- prefill attention

PREFILL_CASES = [
    # dtype, H, KVH, D, block_size, seq_lens, query_lens, block_m, block_n
    (torch.float32, 4, 4, 16, 4, [21, 9], [21, 9], 16, 16),  # plain prefill
    (torch.float32, 8, 4, 32, 8, [37, 12, 5], [10, 12, 1], 16, 16),  # cached prefixes + a decode row
    (torch.float32, 8, 2, 64, 16, [50, 7], [18, 0], 32, 16),  # a sequence with no new tokens
    (torch.float32, 6, 2, 32, 5, [26, 14], [26, 3], 16, 32),  # GQA 3, odd block size
    (torch.float32, 4, 1, 16, 16, [70], [45], None, None),  # default tiles (128 x 64)
    (torch.bfloat16, 8, 2, 32, 8, [33, 17], [20, 17], 32, 16),
    (torch.float16, 4, 2, 16, 4, [19, 6], [8, 6], 16, 16),
]


def make_prefill(dtype: torch.dtype, H: int, KVH: int, D: int, bs: int, lens: list[int], qlens: list[int]):  # noqa: ANN201
    tables = block_tables(lens, bs, num_blocks=sum(-(-n // bs) for n in lens) + 3)
    _, cache = layer_cache(int(tables.max()) + 2, bs, KVH, D, dtype)
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), H, D).to(dtype)
    return q, cache, tables, qsl, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize(("dtype", "H", "KVH", "D", "bs", "lens", "qlens", "bm", "bn"), PREFILL_CASES)
def test_prefill_matches_twin(dtype: torch.dtype, H: int, KVH: int, D: int, bs: int, lens: list[int],
                              qlens: list[int], bm: int | None, bn: int | None) -> None:
    seeded(sum(lens) * 7 + D)
    q, cache, tables, qsl, seq_lens = make_prefill(dtype, H, KVH, D, bs, lens, qlens)
    scale = D**-0.5
    ref = paged_prefill_attention_ref(q, cache, tables, qsl, seq_lens, max(qlens), scale)
    out = paged_prefill_attention(q, cache, tables, qsl, seq_lens, max(qlens), scale, block_m=bm, block_n=bn)
    close(out, ref, dtype)


def test_prefill_single_tokens_equal_decode() -> None:
    """One new token per sequence through the prefill kernel is the decode computation."""
    seeded(5)
    lens = [17, 4, 30]
    q, cache, tables, qsl, seq_lens = make_prefill(torch.float32, 8, 2, 32, 8, lens, [1, 1, 1])
    pre = paged_prefill_attention(q, cache, tables, qsl, seq_lens, 1, 0.3, block_m=16, block_n=16)
    dec = paged_decode_attention(q, cache, tables, seq_lens, 0.3, 2, block_n=16)
    torch.testing.assert_close(pre, dec, rtol=1e-5, atol=1e-5)


def test_twins_agree_with_torch_reference() -> None:
    """The kernels' twins and engine.attention.torch_ref compute the same attention."""
    from engine.attention.torch_ref import paged_attention_ref

    seeded(6)
    lens, qlens = [23, 9], [8, 9]
    q, cache, tables, qsl, seq_lens = make_prefill(torch.float32, 8, 2, 16, 4, lens, qlens)
    meta = AttentionMetadata(qsl, seq_lens, tables, torch.zeros(0, dtype=torch.int64), max(qlens), max(lens),
                             qsl.tolist(), lens)
    torch.testing.assert_close(paged_prefill_attention_ref(q, cache, tables, qsl, seq_lens, 9, 0.25),
                               paged_attention_ref(q, cache, meta, 0.25), rtol=1e-5, atol=1e-5)
    qd = q[:2]
    meta_d = AttentionMetadata(torch.arange(3, dtype=torch.int32), seq_lens, tables, torch.zeros(0, dtype=torch.int64),
                               1, max(lens), [0, 1, 2], lens)
    torch.testing.assert_close(paged_decode_attention_ref(qd, cache, tables, seq_lens, 0.25),
                               paged_attention_ref(qd, cache, meta_d, 0.25), rtol=1e-5, atol=1e-5)


def random_case(seed: int, prefill: bool) -> tuple:
    """A random small configuration: GQA 1/2/4, head_dim 16/32/64, odd block sizes, ragged lengths."""
    g = torch.Generator().manual_seed(seed)

    def pick(options: list):  # noqa: ANN202
        return options[int(torch.randint(len(options), (1,), generator=g))]

    dtype = pick([torch.float32, torch.float32, torch.bfloat16])
    kvh, group, d, bs = pick([1, 2]), pick([1, 2, 4]), pick([16, 32, 64]), pick([1, 3, 4, 8, 16])
    B = int(torch.randint(1, 5, (1,), generator=g))
    lens = torch.randint(0 if not prefill else 1, 48, (B,), generator=g).tolist()
    qlens = [int(torch.randint(0, n + 1, (1,), generator=g)) if prefill else 1 for n in lens]
    return dtype, kvh * group, kvh, d, bs, lens, qlens


@pytest.mark.parametrize("seed", range(8))
def test_decode_random_shapes(seed: int) -> None:
    dtype, H, KVH, D, bs, lens, _ = random_case(seed, prefill=False)
    seeded(seed)
    tables = block_tables(lens, bs, num_blocks=sum(-(-n // bs) for n in lens) + 2)
    _, cache = layer_cache(int(tables.max()) + 2, bs, KVH, D, dtype)
    q = torch.randn(len(lens), H, D).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ref = paged_decode_attention_ref(q, cache, tables, seq_lens, 0.3)
    for splits in (1, 2 + seed % 3):
        close(paged_decode_attention(q, cache, tables, seq_lens, 0.3, splits, block_n=16), ref, dtype)


@pytest.mark.parametrize("seed", range(8))
def test_prefill_random_shapes(seed: int) -> None:
    dtype, H, KVH, D, bs, lens, qlens = random_case(100 + seed, prefill=True)
    seeded(seed)
    q, cache, tables, qsl, seq_lens = make_prefill(dtype, H, KVH, D, bs, lens, qlens)
    max_q = max(max(qlens), 1)
    ref = paged_prefill_attention_ref(q, cache, tables, qsl, seq_lens, max_q, 0.3)
    bm, bn = (16, 16) if seed % 2 else (32, 32)
    close(paged_prefill_attention(q, cache, tables, qsl, seq_lens, max_q, 0.3, block_m=bm, block_n=bn), ref, dtype)


# ------------------------------------------------------------------------------------------------ backend, end to end


class Seq:
    """A sequence's cache blocks and its current length, for building metadata as the model runner does."""

    def __init__(self, blocks: list[int], length: int) -> None:
        self.blocks, self.length = blocks, length


def step_meta(seqs: list[Seq], new: list[int], bs: int) -> AttentionMetadata:
    qsl, lens, slots = [0], [], []
    for s, n in zip(seqs, new, strict=True):
        start, s.length = s.length, s.length + n
        slots += [s.blocks[p // bs] * bs + p % bs for p in range(start, s.length)]
        qsl.append(qsl[-1] + n)
        lens.append(s.length)
    width = max(len(s.blocks) for s in seqs)
    tables = [s.blocks + [0] * (width - len(s.blocks)) for s in seqs]
    return AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32), slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(new), max_seq_len=max(lens), query_start_loc_cpu=qsl, seq_lens_cpu=lens,
    )


@pytest.mark.parametrize(("dtype", "H", "KVH", "D", "bs"), [(torch.float32, 8, 2, 32, 4), (torch.float32, 4, 4, 16, 8),
                                                             (torch.bfloat16, 8, 4, 64, 16)])
def test_backend_matches_torch_backend(dtype: torch.dtype, H: int, KVH: int, D: int, bs: int) -> None:
    """Prefill (one with a cached prefix), a chunked-prefill + decode mix, then decode steps, on a layer view."""
    seeded(H * D + bs)
    num_blocks, num_layers, layer = 24, 2, 1
    # stale finite garbage, not NaN: the torch reference's batched decode multiplies masked slots by 0
    big = torch.randn(num_blocks, num_layers, 2, bs, KVH, D).to(dtype)
    big_ref, big_orig = big.clone(), big.clone()
    perm = torch.randperm(num_blocks).tolist()
    seqs = [Seq(perm[0:7], 0), Seq(perm[7:11], 0), Seq(perm[11:18], 0)]
    # sequence 2 starts with a cached prefix of 6 tokens (already in both caches)
    pre_k, pre_v = torch.randn(6, KVH, D).to(dtype), torch.randn(6, KVH, D).to(dtype)
    pre_slots = torch.tensor([seqs[2].blocks[p // bs] * bs + p % bs for p in range(6)])
    for c in (big, big_ref):
        write_kv_ref(pre_k, pre_v, c[:, layer], pre_slots)
    seqs[2].length = 6
    steps = [[11, 5, 9], [6, 1, 4], [1, 1, 1], [1, 1, 1]]
    triton_be, torch_be = get_attention_backend("triton", torch.device("cpu")), TorchAttention()
    assert isinstance(triton_be, TritonAttention)
    for new in steps:
        meta = step_meta(seqs, new, bs)
        T = sum(new)
        q, k, v = (torch.randn(T, h, D).to(dtype) for h in (H, KVH, KVH))
        out = triton_be.forward(q, k, v, big[:, layer], meta, D**-0.5)
        ref = torch_be.forward(q, k, v, big_ref[:, layer], meta, D**-0.5)
        close(out, ref, dtype)
        torch.testing.assert_close(big, big_ref, rtol=0, atol=0)
    assert torch.equal(big[:, 0], big_orig[:, 0]), "another layer was written"


def test_backend_fixed_splits_and_padded_decode_batch() -> None:
    """CUDA-graph style decode: padding rows with slot -1 and seq_len 0, fixed split count."""
    seeded(8)
    bs, KVH, D, H = 4, 2, 16, 4
    big = torch.randn(10, 2, 2, bs, KVH, D)
    view = big[:, 0]
    tables = torch.tensor([[3, 7, 1], [0, 0, 0], [0, 0, 0]], dtype=torch.int32)
    meta = AttentionMetadata(torch.arange(4, dtype=torch.int32), torch.tensor([10, 0, 0], dtype=torch.int32), tables,
                             torch.tensor([1 * bs + 1, -1, -1]), 1, 10, [0, 1, 2, 3], [10, 0, 0])
    q, k, v = torch.randn(3, H, D), torch.randn(3, KVH, D), torch.randn(3, KVH, D)
    before = big.clone()
    out = TritonAttention(decode_num_splits=4).forward(q, k, v, view, meta, 0.25)
    write_kv_ref(k, v, before[:, 0], meta.slot_mapping)
    torch.testing.assert_close(big, before, rtol=0, atol=0)
    ref = paged_decode_attention_ref(q, view, tables, meta.seq_lens, 0.25)
    close(out, ref, torch.float32)
    assert (out[1:] == 0).all()


def test_engine_greedy_same_with_triton_backend(tiny_llama_dir: str) -> None:
    """The whole engine (chunked prefill, prefix cache hits, decode) generates the same tokens with either backend."""
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.engine import LLMEngine
    from engine.request import SamplingParams

    outs = {}
    for backend in ("torch", "triton"):
        eng = LLMEngine(EngineConfig(model=tiny_llama_dir, attention_backend=backend, cache=CacheConfig(num_blocks=32),
                                     scheduler=SchedulerConfig(max_num_batched_tokens=24)))
        assert eng._runner.attn.name == backend
        prompts = {"a": list(range(3, 40)), "b": list(range(3, 30)) + [7, 8], "c": [5, 9, 11]}
        params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        for rid, p in prompts.items():
            eng.add_request(rid, p, params)
        got: dict[str, list[int]] = {rid: [] for rid in prompts}
        while eng.has_unfinished():
            for so in eng.step():
                got[so.request_id].extend(so.new_token_ids)
        outs[backend] = got
    assert outs["triton"] == outs["torch"]


# ----------------------------------------------------------------------------------------------------- rmsnorm


@pytest.mark.parametrize(("N", "C", "dtype", "w_dtype"), [(5, 64, torch.float32, torch.float32),
                                                          (3, 96, torch.bfloat16, torch.bfloat16),
                                                          (4, 48, torch.float16, torch.float32)])
def test_fused_add_rmsnorm_matches_twin(N: int, C: int, dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    from engine.models.llama import RMSNorm

    seeded(N * C)
    x, r = torch.randn(N, C).to(dtype), torch.randn(N, C).to(dtype)
    w = (torch.rand(C) + 0.5).to(w_dtype)
    out, h = fused_add_rmsnorm(x, r, w, 1e-5)
    out_ref, h_ref = fused_add_rmsnorm_ref(x, r, w, 1e-5)
    # The interpreter truncates fp32 -> bf16 (a GPU rounds to nearest even, as torch does): one ulp allowed there.
    torch.testing.assert_close(h, h_ref, rtol=2**-7 if dtype == torch.bfloat16 else 0, atol=0)
    assert out.dtype == out_ref.dtype
    close(out, out_ref, dtype)
    norm = RMSNorm(C, 1e-5).to(w_dtype)
    norm.weight.data.copy_(w)
    with torch.no_grad():
        torch.testing.assert_close(out_ref, norm(x + r)[0])


# ---------------------------------------------------------------- rotary, silu_and_mul
@pytest.mark.parametrize("T, H, KVH, D, dtype", [(5, 4, 2, 16, torch.float32), (9, 8, 2, 32, torch.float32),
                                                 (3, 6, 3, 64, torch.bfloat16)])
def test_rotary_matches_twin(T: int, H: int, KVH: int, D: int, dtype: torch.dtype) -> None:
    from engine.kernels.rotary import apply_rotary, apply_rotary_ref
    from engine.models.llama import RotaryEmbedding

    rope = RotaryEmbedding(D, 64, 10000.0, None)
    qkv = torch.randn(T, (H + 2 * KVH) * D).to(dtype)  # q and k are strided views of one projection, as in the model
    q = qkv[:, : H * D].view(T, H, D)
    k = qkv[:, H * D : (H + KVH) * D].view(T, KVH, D)
    pos = torch.randint(0, 64, (T,))
    want_q, want_k = apply_rotary_ref(pos, q, k, rope.cos, rope.sin)
    v_before = qkv[:, (H + KVH) * D :].clone()
    apply_rotary(pos, q, k, rope.cos, rope.sin)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q, want_q, atol=tol, rtol=tol)
    torch.testing.assert_close(k, want_k, atol=tol, rtol=tol)
    assert torch.equal(qkv[:, (H + KVH) * D :], v_before), "rotary wrote outside q and k"


@pytest.mark.parametrize("T, inter", [(1, 8), (7, 100), (4, 1500)])
def test_silu_and_mul_matches_twin(T: int, inter: int) -> None:
    from engine.kernels.activation import silu_and_mul, silu_and_mul_ref

    x = torch.randn(T, 2 * inter) * 3
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), atol=1e-5, rtol=1e-5)


def test_copy_blocks_matches_twin() -> None:
    from kvtransfer.gpu_copy import copy_blocks, copy_blocks_ref

    src = torch.randn(12, 2, 2, 4, 3, 8)
    dst, want = torch.full((10, 2, 2, 4, 3, 8), float("nan")), torch.full((10, 2, 2, 4, 3, 8), float("nan"))
    src_ids, dst_ids = torch.tensor([11, 0, 5, 6, 2]), torch.tensor([3, 9, 0, 1, 4])
    copy_blocks(src, dst, src_ids, dst_ids)
    copy_blocks_ref(src, want, src_ids, dst_ids)
    assert torch.equal(dst.nan_to_num(7.0), want.nan_to_num(7.0))


@pytest.mark.parametrize("T, H, KVH, D, dtype, cache_dtype", [(5, 4, 2, 16, torch.float32, torch.float32),
                                                              (9, 8, 2, 32, torch.bfloat16, torch.bfloat16),
                                                              (3, 6, 3, 64, torch.float32, torch.float16)])
def test_rotary_write_kv_matches_twin(T: int, H: int, KVH: int, D: int, dtype: torch.dtype,
                                      cache_dtype: torch.dtype) -> None:
    from engine.kernels.kv_write import rotary_write_kv, rotary_write_kv_ref
    from engine.models.llama import RotaryEmbedding

    seeded(T * H + D)
    rope = RotaryEmbedding(D, 64, 10000.0, None)
    qkv = torch.randn(T, (H + 2 * KVH) * D).to(dtype)  # strided views of one projection, as in the model
    q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
    q, k, v = q.view(T, H, D), k.view(T, KVH, D), v.view(T, KVH, D)
    pos = torch.randint(0, 64, (T,))
    slots = torch.randperm(8 * 4)[:T]
    slots[1] = -1  # padding row: rotated query, nothing written
    big, cache = layer_cache(8, 4, KVH, D, cache_dtype, fill="nan")
    big_ref = big.clone()
    q_ref, k_before = q.clone(), k.clone()
    rotary_write_kv_ref(pos, q_ref, k.clone(), v, rope.cos, rope.sin, big_ref[:, 1], slots)
    rotary_write_kv(pos, q, k, v, rope.cos, rope.sin, cache, slots)
    tol = 1e-5 if dtype == cache_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q, q_ref, atol=tol, rtol=tol)
    assert torch.equal(k, k_before), "the key tensor itself must be left unrotated"
    torch.testing.assert_close(big.nan_to_num(7.0), big_ref.nan_to_num(7.0), atol=tol, rtol=tol)
    assert big[:, 1].isnan().sum() == big_ref[:, 1].isnan().sum(), "wrote slots it should not have"


@pytest.mark.parametrize("N, K, dtype, bias, config", [(64, 128, torch.float32, False, (8, 32, 4, 1)),
                                                       (50, 100, torch.float32, True, (8, 32, 4, 1)),
                                                       (96, 96, torch.bfloat16, False, (16, 32, 4, 2)),
                                                       (33, 128, torch.float16, True, None)])
def test_gemv_matches_twin(N: int, K: int, dtype: torch.dtype, bias: bool,
                           config: tuple[int, int, int, int] | None) -> None:
    from engine.kernels.gemv import gemv, gemv_ref

    seeded(N + K)
    x, w = torch.randn(1, K).to(dtype), (torch.randn(N, K) / K**0.5).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    y = gemv(x, w, b, config=config)
    assert y.shape == (1, N) and y.dtype == dtype
    close(y, gemv_ref(x, w, b), dtype)
    with pytest.raises(AssertionError, match="need x"):
        gemv(torch.randn(2, K).to(dtype), w)
