"""Paged causal attention for a ragged batch of new tokens (prefill, chunked prefill, cached prefixes).

Sequence b owns query rows query_start_loc[b]:query_start_loc[b+1] (q_len of them): its last q_len positions
out of seq_lens[b]; every key/value (cached prefix and the new ones, already written) is read from the paged
cache through its block table. New token i sits at absolute position seq_len - q_len + i and sees keys 0..that.

Flash-attention tiling: a program per (sequence, KV head, tile of BLOCK_T new tokens). GQA: the G query heads
that share the KV head are packed into the tile's rows (row = head_in_group * BLOCK_T + token), so the
[BLOCK_M = G' * BLOCK_T, D] query tile multiplies each K/V tile once for the whole group. It walks the keys in
BLOCK_N tiles up to the tile's last causal position with an online softmax (base 2, fp32 accumulation);
QK^T and PV are `tl.dot`s.

Sliding window W: query position p sees keys p - W + 1 .. p. A tile reads keys from the window start of its
first query on (positions before it are never loaded, so their block-table entries are never read); key
tiles inside every row's window and causal range run unmasked. Soft-cap c: scores become c * tanh(s / c).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import ATTN_DTYPES, dot_upcast, score_scales, tanh


@triton.jit
def _prefill_tiles(
    acc, l_i, m_i, q, q_pos, q_ptr, cache_ptr, bt_row, head_off, lo, hi, kv_lo, kv_end, window,
    stride_btn, stride_cb, stride_cs, stride_ckv, stride_cd, qk_scale, cap_log2, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Online softmax over key tiles [lo, hi); keys outside [kv_lo, kv_end) are not loaded. MASK: apply the
    causal and window masks per row (else every loaded key is visible to every row)."""
    QDT = q_ptr.dtype.element_ty
    n_off = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + n_off
        n_mask = (pos < kv_end) & (pos >= kv_lo)
        page = tl.load(bt_row + (pos // block_size) * stride_btn, mask=n_mask, other=0).to(tl.int64)
        tok = page * stride_cb + (pos % block_size) * stride_cs + head_off
        k_t = tl.load(cache_ptr + tok[None, :] + d[:, None] * stride_cd,
                      mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # [D, N]
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
        if MASK:
            visible = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - window) & n_mask[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet stays empty
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            pv = tl.dot(p.to(QDT).to(tl.float32), v)
        elif IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(QDT), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(
    q_ptr, cache_ptr, bt_ptr, qsl_ptr, lens_ptr, out_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_cb, stride_ckv, stride_cs, stride_ch, stride_cd,
    stride_btb, stride_btn,
    stride_ot, stride_oh, stride_od,
    qk_scale, cap_log2, window, block_size,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    mt = tl.num_programs(2) - 1 - tl.program_id(2)  # the longest (last) query tiles are launched first
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if mt * BLOCK_T >= q_len:
        return
    seq_len = tl.load(lens_ptr + b)
    ctx_len = seq_len - q_len

    r = tl.arange(0, BLOCK_M)
    gi = r // BLOCK_T
    ti = mt * BLOCK_T + r % BLOCK_T
    row_mask = (gi < GROUP) & (ti < q_len)
    heads = kvh * GROUP + gi
    toks = (q_start + ti).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + toks[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    # Rows past q_len get positions >= seq_len, so they see every key: finite softmax, never stored.
    q_pos = ctx_len + ti

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    head_off = kvh * stride_ch
    first_q = ctx_len + mt * BLOCK_T
    kv_end = tl.minimum(first_q + BLOCK_T, seq_len)  # one past the tile's last real query position
    w = tl.where(window > 0, window, first_q + BLOCK_T + 1)  # no window: wider than any row's context
    kv_lo = tl.maximum(first_q - w + 1, 0)  # the first key any row of the tile sees
    # Key tiles [mid, full_end) lie inside every row's window and at or before its position: no masks there.
    full_end = (first_q + 1) // BLOCK_N * BLOCK_N
    mid = tl.minimum(tl.cdiv(tl.maximum(kv_end - w, 0), BLOCK_N) * BLOCK_N, full_end)
    acc, l_i, m_i = _prefill_tiles(
        acc, l_i, m_i, q, q_pos, q_ptr, cache_ptr, bt_row, head_off, kv_lo // BLOCK_N * BLOCK_N, mid, kv_lo, kv_end,
        w, stride_btn, stride_cb, stride_cs, stride_ckv, stride_cd, qk_scale, cap_log2, block_size,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, UPCAST, IEEE, SOFTCAP,
    )
    acc, l_i, m_i = _prefill_tiles(
        acc, l_i, m_i, q, q_pos, q_ptr, cache_ptr, bt_row, head_off, mid, full_end, kv_lo, kv_end,
        w, stride_btn, stride_cb, stride_cs, stride_ckv, stride_cd, qk_scale, cap_log2, block_size,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, UPCAST, IEEE, SOFTCAP,
    )
    acc, l_i, m_i = _prefill_tiles(
        acc, l_i, m_i, q, q_pos, q_ptr, cache_ptr, bt_row, head_off, full_end, kv_end, kv_lo, kv_end,
        w, stride_btn, stride_cb, stride_cs, stride_ckv, stride_cd, qk_scale, cap_log2, block_size,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, UPCAST, IEEE, SOFTCAP,
    )

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    dst = out_ptr + toks[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :] * stride_od
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def _check(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, query_start_loc: torch.Tensor,
           seq_lens: torch.Tensor) -> None:
    assert q.dim() == 3, f"q must be [T, H, D], got {q.shape}"
    assert kv_cache.dim() == 5 and kv_cache.shape[1] == 2, f"kv_cache must be [blocks, 2, bs, kvh, d], got {kv_cache.shape}"
    T, H, D = q.shape
    KVH = kv_cache.shape[3]
    assert kv_cache.shape[4] == D, f"head_dim mismatch: q {D}, kv_cache {kv_cache.shape[4]}"
    assert H % KVH == 0, f"num_heads {H} is not a multiple of num_kv_heads {KVH}"
    B = seq_lens.shape[0]
    assert seq_lens.dim() == 1 and query_start_loc.shape == (B + 1,), \
        f"seq_lens [B] and query_start_loc [B+1] disagree: {seq_lens.shape} / {query_start_loc.shape}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B, f"block_tables must be [B={B}, n], got {block_tables.shape}"
    for name, t in (("block_tables", block_tables), ("query_start_loc", query_start_loc), ("seq_lens", seq_lens)):
        assert t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}"
    assert q.dtype in ATTN_DTYPES and kv_cache.dtype in ATTN_DTYPES, f"unsupported dtypes {q.dtype} / {kv_cache.dtype}"
    assert q.device == kv_cache.device == block_tables.device == query_start_loc.device == seq_lens.device, \
        "all tensors must be on one device"


def paged_prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context.

    q: [T, H, D] fp32/bf16/fp16, rows grouped by sequence; kv_cache: [num_blocks, 2, block_size, KVH, D] (any
    strides, new K/V already written); block_tables: [B, max_blocks] int32; query_start_loc: [B+1] int32;
    seq_lens: [B] int32 (>= each sequence's new-token count); max_query_len: >= the longest run of new tokens
    (sizes the grid); window: each query attends to the last `window` keys only; softcap: scores c * tanh(s / c).
    Returns [T, H, D] in q's dtype. Tuning knobs: block_m (query rows per tile, all heads
    of a group together), block_n (keys per tile; both powers of two >= 16), num_warps, num_stages.
    """
    _check(q, kv_cache, block_tables, query_start_loc, seq_lens)
    T, H, D = q.shape
    KVH = kv_cache.shape[3]
    B = seq_lens.shape[0]
    out = torch.empty_like(q)
    if T == 0 or B == 0 or max_query_len <= 0:
        return out
    group = H // KVH
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_M = block_m or (128 if BLOCK_D <= 128 else 64)
    BLOCK_N = block_n or 32  # H100 sweep (benchmarks/kernels_gpu.py --sweep): 128 x 32, 8 warps, 2 stages was best
    BLOCK_G = triton.next_power_of_2(group)
    BLOCK_M = max(BLOCK_M, BLOCK_G, 16)
    BLOCK_T = BLOCK_M // BLOCK_G
    for blk in (BLOCK_M, BLOCK_N):
        assert blk >= 16 and blk & (blk - 1) == 0, f"tile sizes must be powers of two >= 16, got {blk}"
    assert window is None or window > 0, f"window must be positive, got {window}"
    qk_scale, cap_log2 = score_scales(scale, softcap)
    num_warps = num_warps or (8 if BLOCK_M * BLOCK_D >= 128 * 128 else 4)
    num_stages = num_stages or 2
    grid = (B, KVH, triton.cdiv(max_query_len, BLOCK_T))
    _prefill_kernel[grid](
        q, kv_cache, block_tables, query_start_loc, seq_lens, out,
        *q.stride(), *kv_cache.stride(), *block_tables.stride(), *out.stride(),
        qk_scale, cap_log2, window or 0, kv_cache.shape[2],
        HEAD_DIM=D, GROUP=group, BLOCK_T=BLOCK_T, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
        UPCAST=dot_upcast(q.dtype, q.device), IEEE=q.dtype == torch.float32, SOFTCAP=softcap is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
    **_: object,
) -> torch.Tensor:
    """Pure-torch twin of `paged_prefill_attention` (fp32 math, K/V rounded to q's dtype first as the kernel does)."""
    _check(q, kv_cache, block_tables, query_start_loc, seq_lens)
    T, H, D = q.shape
    KVH, bs = kv_cache.shape[3], kv_cache.shape[2]
    out = torch.zeros_like(q)
    qsl = query_start_loc.tolist()
    for b, L in enumerate(seq_lens.tolist()):
        n = qsl[b + 1] - qsl[b]
        if n == 0:
            continue
        assert n <= max_query_len and n <= L, f"sequence {b}: {n} new tokens, max_query_len {max_query_len}, seq_len {L}"
        pages = block_tables[b, : -(-L // bs)].long()
        k = kv_cache[pages, 0].flatten(0, 1)[:L].to(q.dtype).float().repeat_interleave(H // KVH, dim=1)
        v = kv_cache[pages, 1].flatten(0, 1)[:L].to(q.dtype).float().repeat_interleave(H // KVH, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[qsl[b] : qsl[b + 1]].float(), k) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        visible = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(diagonal=L - n)
        if window is not None:
            visible &= torch.ones_like(visible).triu(diagonal=L - n - window + 1)
        p = s.masked_fill(~visible, float("-inf")).softmax(-1)
        out[qsl[b] : qsl[b + 1]] = torch.einsum("hqk,khd->qhd", p, v).to(q.dtype)
    return out
