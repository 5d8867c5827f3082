"""Paged decode attention: one new query per sequence over its block table (flash-decoding, GQA).

Stage 1 runs a program per (sequence, KV head, split). The program loads the queries of the G = H / KVH heads
that share its KV head as one [G, D] tile (padded to 16 rows so `tl.dot` applies), so each K/V tile is read
from HBM once per group, not once per query head. The sequence's keys are cut into `num_splits` equal
partitions (rounded up to whole BLOCK_N tiles; trailing ones may be empty); each program runs an online
softmax over its partition and writes its normalised partial output and its log-sum-exp (base 2).
Stage 2 runs a program per (sequence, query head) and merges the partials: out = sum_s w_s o_s / sum_s w_s
with w_s = 2^(lse_s - max lse). With one split, stage 1 writes the output itself and stage 2 is skipped.

Sliding window W: the query (position seq_len - 1) sees keys seq_len - W .. seq_len - 1; the splits partition
that range and nothing before it is read. Soft-cap c: scores become c * tanh(s / c) before the softmax.

Sequences with seq_len 0 (CUDA-graph padding) read no K/V and produce zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import ATTN_DTYPES, dot_upcast, score_scales, tanh


@triton.jit
def _decode_split_kernel(
    q_ptr, cache_ptr, bt_ptr, lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_cb, stride_ckv, stride_cs, stride_ch, stride_cd,
    stride_btb, stride_btn,
    stride_ob, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_lb, stride_lh, stride_ls,
    qk_scale, cap_log2, window, block_size,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sid = tl.program_id(2)
    b64 = b.to(tl.int64)
    seq_len = tl.load(lens_ptr + b)
    QDT = q_ptr.dtype.element_ty

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    lo = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)  # the first key the query sees
    split_len = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + sid * split_len
    end = tl.minimum(start + split_len, seq_len)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    n_off = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + b64 * stride_btb
    head_off = kvh * stride_ch
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + n_off
        n_mask = pos < end
        page = tl.load(bt_row + (pos // block_size) * stride_btn, mask=n_mask, other=0).to(tl.int64)
        tok = page * stride_cb + (pos % block_size) * stride_cs + head_off
        kv_mask = n_mask[None, :] & d_mask[:, None]
        k_t = tl.load(cache_ptr + tok[None, :] + d[:, None] * stride_cd, mask=kv_mask, other=0.0)  # [D, N]
        v = tl.load(cache_ptr + stride_ckv + tok[:, None] + d[None, :] * stride_cd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [N, D]
        k_t = k_t.to(QDT)  # K/V are rounded to q's dtype, as the torch reference does
        v = v.to(QDT)
        if UPCAST:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:  # noqa: SIM108 - constexpr branch: only one tl.dot is traced
            s = tl.dot(q, k_t, input_precision="ieee")
        else:
            s = tl.dot(q, k_t)
        if SOFTCAP:  # noqa: SIM108 - constexpr branch
            s = tanh(s * qk_scale) * cap_log2
        else:
            s = s * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            pv = tl.dot(p.to(QDT).to(tl.float32), v)
        elif IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(QDT), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    o_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        dst = out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        dst = part_o_ptr + b64 * stride_pb + heads[:, None] * stride_ph + sid * stride_ps + d[None, :] * stride_pd
        tl.store(dst, o, mask=o_mask)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + b64 * stride_lb + heads * stride_lh + sid * stride_ls, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_lb, stride_lh, stride_ls,
    stride_ob, stride_oh, stride_od,
    head_dim,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    d_mask = d < head_dim
    lse = tl.load(part_lse_ptr + b * stride_lb + h * stride_lh + s * stride_ls, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # 0 for empty splits
    o = tl.load(part_o_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :] * stride_pd,
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d * stride_od, res.to(out_ptr.dtype.element_ty), mask=d_mask)


def _check(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    assert q.dim() == 3, f"q must be [B, H, D], got {q.shape}"
    assert kv_cache.dim() == 5 and kv_cache.shape[1] == 2, f"kv_cache must be [blocks, 2, bs, kvh, d], got {kv_cache.shape}"
    B, H, D = q.shape
    KVH = kv_cache.shape[3]
    assert kv_cache.shape[4] == D, f"head_dim mismatch: q {D}, kv_cache {kv_cache.shape[4]}"
    assert H % KVH == 0, f"num_heads {H} is not a multiple of num_kv_heads {KVH}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B, f"block_tables must be [B={B}, n], got {block_tables.shape}"
    assert seq_lens.shape == (B,), f"seq_lens must be [B={B}], got {seq_lens.shape}"
    assert block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32, "block_tables/seq_lens must be int32"
    assert q.dtype in ATTN_DTYPES and kv_cache.dtype in ATTN_DTYPES, f"unsupported dtypes {q.dtype} / {kv_cache.dtype}"
    assert q.device == kv_cache.device == block_tables.device == seq_lens.device, "all tensors must be on one device"


def default_num_splits(max_seq_len: int, batch: int, num_kv_heads: int) -> int:
    """Splits per sequence: enough programs to fill a GPU (~512), at least 256 keys per split, at most 32."""
    by_len = triton.cdiv(max(max_seq_len, 1), 256)
    by_occupancy = triton.cdiv(512, max(batch * num_kv_heads, 1))
    return max(1, min(by_len, by_occupancy, 32))


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    max_seq_len: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attention of q[b] (the newest token of sequence b) over that sequence's first seq_lens[b] cached keys.

    q: [B, H, D] fp32/bf16/fp16; kv_cache: [num_blocks, 2, block_size, KVH, D] (any strides; H % KVH == 0);
    block_tables: [B, max_blocks] int32; seq_lens: [B] int32 (0 allowed: that row comes out zero).
    num_splits: key partitions per sequence (flash-decoding); None picks it from max_seq_len (pass
    max_seq_len to avoid a device sync) and batch size. window: attend to the last `window` keys only;
    softcap: scores c * tanh(s / c). Returns [B, H, D] in q's dtype (fp32 accumulation).
    Tuning knobs: block_n (keys per tile, a power of two >= 16), num_warps, num_stages.
    """
    _check(q, kv_cache, block_tables, seq_lens)
    B, H, D = q.shape
    KVH = kv_cache.shape[3]
    out = torch.empty_like(q)
    if B == 0:
        return out
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max().item())
        num_splits = default_num_splits(min(max_seq_len, window or max_seq_len), B, KVH)
    assert num_splits >= 1 and (window is None or window > 0)
    qk_scale, cap_log2 = score_scales(scale, softcap)
    group = H // KVH
    BLOCK_G = max(16, triton.next_power_of_2(group))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N = block_n or (64 if BLOCK_D <= 128 else 32)
    assert BLOCK_N >= 16 and BLOCK_N & (BLOCK_N - 1) == 0
    if num_splits > 1:
        part_o = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_o = torch.empty(1, 1, 1, 1, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(1, 1, 1, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B, KVH, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, part_o, part_lse,
        *q.stride(), *kv_cache.stride(), *block_tables.stride(), *out.stride(),
        *part_o.stride(), *part_lse.stride(),
        qk_scale, cap_log2, window or 0, kv_cache.shape[2],
        HEAD_DIM=D, GROUP=group, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, NUM_SPLITS=num_splits,
        UPCAST=dot_upcast(q.dtype, q.device), IEEE=q.dtype == torch.float32, SOFTCAP=softcap is not None,
        num_warps=num_warps or 4, num_stages=num_stages or 2,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(B, H)](
            part_o, part_lse, out,
            *part_o.stride(), *part_lse.stride(), *out.stride(),
            D,
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=BLOCK_D, num_warps=1,
        )
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    **_: object,
) -> torch.Tensor:
    """Pure-torch twin of `paged_decode_attention` (fp32 math, K/V rounded to q's dtype first as the kernel does)."""
    _check(q, kv_cache, block_tables, seq_lens)
    B, H, D = q.shape
    KVH, bs = kv_cache.shape[3], kv_cache.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        pages = block_tables[b, : -(-n // bs)].long()
        k = kv_cache[pages, 0].flatten(0, 1)[:n].to(q.dtype).float()  # [n, KVH, D]
        v = kv_cache[pages, 1].flatten(0, 1)[:n].to(q.dtype).float()
        k = k.repeat_interleave(H // KVH, dim=1)
        v = v.repeat_interleave(H // KVH, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if window is not None:
            s[:, : max(0, n - window)] = float("-inf")
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(-1), v).to(q.dtype)
    return out
