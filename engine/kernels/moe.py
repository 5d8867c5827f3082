"""Mixture-of-experts kernels: top-k routing, and the experts' two projections as grouped GEMMs.

moe_route: one program per token: softmax over the router logits, the k largest (lowest expert id first on
ties), optionally renormalised.

fused_moe, for P = T * k (token, expert) pairs:
1. align (one program): count the pairs of each expert with atomic tickets (a pair's ticket is its row within its
   expert's group), pad every count to a multiple of BLOCK_M, and write the pairs' ids grouped by expert into
   `sorted_ids` (padding rows hold P) plus the expert of each BLOCK_M row block (-1 past the end). Rows do not
   interact in the GEMMs and step 4 sums in pair order, so the tickets' order does not change any result. Sizes
   depend only on T, k and E, so the launch is CUDA-graph safe: at most cdiv(P, BLOCK_M) + min(E, P) blocks can
   be non-empty.
2. gate/up GEMM: a program per (row block, tile of I columns) multiplies its rows of x by its expert's gate and
   up tiles and stores act(gate) * up: [P, I].
3. down GEMM: the same over [P, I] with the down weights, each row scaled by its routing weight: [P, H].
4. combine: out[t] = sum over the k rows of token t (a fixed order: deterministic).
Every expert's weights are read once per step, by the row blocks of that expert only: a decode step reads
the experts its tokens chose and no others.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import dot_upcast, tanh

ACTIVATIONS = ("silu", "gelu_tanh")


@triton.jit
def _route_kernel(logits_ptr, w_ptr, ids_ptr, stride_l, E, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_E: tl.constexpr, NORMALIZE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    x = tl.load(logits_ptr + t * stride_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = p / tl.sum(p, 0)
    j = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_K], tl.float32)
    top_id = tl.zeros([BLOCK_K], tl.int32)
    for i in tl.static_range(TOP_K):
        best = tl.max(p, 0)
        idx = tl.min(tl.where(p == best, e, BLOCK_E), 0)  # the lowest id among equal maxima
        top_w = tl.where(j == i, best, top_w)
        top_id = tl.where(j == i, idx, top_id)
        p = tl.where(e == idx, -1.0, p)
    if NORMALIZE:
        top_w = top_w / tl.sum(top_w, 0)
    tl.store(w_ptr + t * TOP_K + j, top_w, mask=j < TOP_K)
    tl.store(ids_ptr + t * TOP_K + j, top_id.to(tl.int64), mask=j < TOP_K)


def _check_route(logits: torch.Tensor, top_k: int) -> None:
    assert logits.dim() == 2 and logits.stride(1) == 1, f"logits must be [T, E] row-major, got {tuple(logits.shape)}"
    assert 1 <= top_k <= logits.shape[1], f"top_k {top_k} out of range for {logits.shape[1]} experts"


def moe_route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32, ids [T, k] int64): the k most probable experts of softmax(logits)
    in descending order, their probabilities renormalised to sum 1 when `normalize`."""
    _check_route(logits, top_k)
    T, E = logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T:
        _route_kernel[(T,)](logits, weights, ids, logits.stride(0), E, TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k),
                            BLOCK_E=triton.next_power_of_2(E), NORMALIZE=normalize)
    return weights, ids


def moe_route_ref(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch twin of `moe_route`."""
    _check_route(logits, top_k)
    weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True) if normalize else weights), ids


# P (token-expert pairs) and num_blocks change with every batch: not specialised on (a 1 or a multiple of 16 would
# each compile a variant of its own in the middle of a request; engine/batch.py says more).
@triton.jit(do_not_specialize=["P", "num_blocks"])
def _align_kernel(ids_ptr, scratch_ptr, rank_ptr, sorted_ptr, block_expert_ptr, P, num_blocks, E,
                  BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    e = tl.arange(0, BLOCK_E)
    tl.store(scratch_ptr + e, tl.zeros([BLOCK_E], tl.int32))
    tl.debug_barrier()
    for p0 in range(0, P, BLOCK_P):  # each pair's rank among its expert's pairs: an atomic ticket (any order works)
        p = p0 + tl.arange(0, BLOCK_P)
        ids = tl.load(ids_ptr + p, mask=p < P, other=0).to(tl.int32)
        tl.store(rank_ptr + p, tl.atomic_add(scratch_ptr + ids, 1, mask=p < P), mask=p < P)
    tl.debug_barrier()
    counts = tl.load(scratch_ptr + e, mask=e < E, other=0, cache_modifier=".cg")
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    total = tl.sum(padded, 0)
    for b0 in range(0, num_blocks, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        expert = tl.sum((ends[None, :] <= b[:, None] * BLOCK_M).to(tl.int32), 1)  # experts wholly before the block
        tl.store(block_expert_ptr + b, tl.where(b * BLOCK_M < total, expert, -1), mask=b < num_blocks)
    j = tl.arange(0, BLOCK_M)
    pad = (j[None, :] < (padded - counts)[:, None]) & (e < E)[:, None]
    tl.store(sorted_ptr + (starts + counts)[:, None] + j[None, :], P, mask=pad)  # padding rows: pair id P
    tl.debug_barrier()  # every thread has read the counts: the scratch now holds each expert's first row
    tl.store(scratch_ptr + e, starts)
    tl.debug_barrier()
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ids = tl.load(ids_ptr + p, mask=p < P, other=0).to(tl.int32)
        first = tl.load(scratch_ptr + ids, mask=p < P, other=0, cache_modifier=".cg")
        rank = tl.load(rank_ptr + p, mask=p < P, other=0, cache_modifier=".cg")
        tl.store(sorted_ptr + first + rank, p, mask=p < P)


@triton.jit(do_not_specialize=["P"])
def _expert_gemm_kernel(
    a_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, topk_w_ptr,
    N, K, P, a_row_div, stride_am, stride_we, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr, GELU: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert < 0:
        return
    pair = tl.load(sorted_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pair < P
    a_rows = a_ptr + (pair // a_row_div).to(tl.int64)[:, None] * stride_am
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + ks[None, :], mask=valid[:, None] & (ks < K)[None, :], other=0.0)
        w_mask = (ks < K)[:, None] & (cols < N)[None, :]
        acc = _dot_acc(acc, a, tl.load(w_cols + ks[:, None], mask=w_mask, other=0.0), UPCAST, IEEE)
        if GATED:  # the up rows of expert's [2N, K] gate|up matrix sit N rows below the gate rows
            up = tl.load(w_cols + N * stride_wn + ks[:, None], mask=w_mask, other=0.0)
            acc_up = _dot_acc(acc_up, a, up, UPCAST, IEEE)
    if GATED:
        acc = _act(acc.to(out_ptr.dtype.element_ty).to(tl.float32), GELU) * acc_up.to(out_ptr.dtype.element_ty)
    if MUL_WEIGHT:
        acc = acc * tl.load(topk_w_ptr + pair, mask=valid, other=0.0)[:, None]
    dst = out_ptr + pair.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (cols < N)[None, :])


@triton.jit
def _dot_acc(acc, a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):  # noqa: ANN001, ANN202
    if UPCAST:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32))
    if IEEE:
        return acc + tl.dot(a, b, input_precision="ieee")
    return acc + tl.dot(a, b)


@triton.jit
def _act(g, GELU: tl.constexpr):  # noqa: ANN001, ANN202
    if GELU:
        return 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))  # 0.797.. = sqrt(2 / pi)
    return g / (1.0 + tl.exp(-g))


def _check_moe(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
               ids: torch.Tensor, activation: str) -> None:
    assert x.dim() == 2 and w_gate_up.dim() == 3 and w_down.dim() == 3, "x [T, H], w_gate_up [E, 2I, H], w_down [E, H, I]"
    E, two_i, H = w_gate_up.shape
    assert x.shape[1] == H and two_i % 2 == 0 and w_down.shape == (E, H, two_i // 2), \
        f"shapes disagree: x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)}, w_down {tuple(w_down.shape)}"
    assert ids.dim() == 2 and ids.shape[0] == x.shape[0] and weights.shape == ids.shape, \
        f"weights/ids must be [T, k]: {tuple(weights.shape)} / {tuple(ids.shape)}"
    assert activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {activation!r}"
    assert x.dtype == w_gate_up.dtype == w_down.dtype and x.device == w_gate_up.device == ids.device


ALIGN_BLOCK_P = 1024  # pairs per pass of the align kernel: one width for every batch, so one compiled variant


def block_m_classes(experts: int, top_k: int) -> list[int]:
    """Token counts whose batches reach each row-block size `_block_m` can choose (16, 32, 64): each size is its
    own compiled variant of the expert GEMM, so the engine's start-up warm-up runs one batch of each."""
    return [max(1, -(-rows * experts // top_k)) for rows in (1, 17, 33)]


def _block_m(pairs: int, experts: int) -> int:
    """Rows per block: about the pairs an expert gets, at least 16 (tl.dot's smallest tile), at most 64."""
    return min(64, max(16, triton.next_power_of_2(-(-pairs // experts))))


def fused_moe(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, activation: str = "silu",
              config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t])) with e = ids[t, j].

    x: [T, H]; w_gate_up: [E, 2I, H] (gate rows then up rows, each expert row-major); w_down: [E, H, I];
    weights: [T, k] float32; ids: [T, k] integer. Returns [T, H] in x's dtype (fp32 accumulation).
    config = (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) overrides the tile choice (benchmarks sweep it)."""
    _check_moe(x, w_gate_up, w_down, weights, ids, activation)
    assert x.stride(1) == w_gate_up.stride(2) == w_down.stride(2) == 1, "the reduced dims must be contiguous"
    (T, H), (E, two_i, _), k = x.shape, w_gate_up.shape, ids.shape[1]
    P, inter = T * k, two_i // 2
    if T == 0:
        return torch.zeros_like(x)
    bm = _block_m(P, E)
    # few rows per expert (decode): narrow column tiles and long K steps, so enough programs stream the weights
    bm, bn, bk, warps = config or ((bm, 32, 128, 4) if bm == 16 else (bm, 64, 64, 4))
    num_blocks = triton.cdiv(P, bm) + min(E, P)
    sorted_ids = torch.empty(num_blocks * bm, dtype=torch.int32, device=x.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=x.device)
    block_e = triton.next_power_of_2(E)
    scratch, rank = torch.empty(block_e, dtype=torch.int32, device=x.device), torch.empty(P, dtype=torch.int32,
                                                                                          device=x.device)
    _align_kernel[(1,)](ids.reshape(-1), scratch, rank, sorted_ids, block_expert, P, num_blocks, E, BLOCK_E=block_e,
                        BLOCK_P=ALIGN_BLOCK_P, BLOCK_M=bm, BLOCK_B=64, num_warps=4)
    inner = torch.empty(P, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(P, H, dtype=x.dtype, device=x.device)
    flat_w = weights.reshape(-1).float().contiguous()
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=dot_upcast(x.dtype, x.device),
                IEEE=x.dtype == torch.float32, num_warps=warps)
    _expert_gemm_kernel[(num_blocks, triton.cdiv(inter, bn))](
        x, w_gate_up, inner, sorted_ids, block_expert, flat_w, inter, H, P, k, x.stride(0), w_gate_up.stride(0),
        w_gate_up.stride(1), inner.stride(0), GATED=True, GELU=activation == "gelu_tanh", MUL_WEIGHT=False, **meta)
    _expert_gemm_kernel[(num_blocks, triton.cdiv(H, bn))](
        inner, w_down, y, sorted_ids, block_expert, flat_w, H, inter, P, 1, inner.stride(0), w_down.stride(0),
        w_down.stride(1), y.stride(0), GATED=False, GELU=False, MUL_WEIGHT=True, **meta)
    return y.view(T, k, H).sum(dim=1)


def fused_moe_ref(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, activation: str = "silu", **_: object) -> torch.Tensor:
    """Pure-torch twin of `fused_moe`: one pair of matmuls per (token, expert) pair, fp32 math, rounded where
    the kernel rounds (the gate/up products and act(gate) * up to x's dtype)."""
    _check_moe(x, w_gate_up, w_down, weights, ids, activation)
    inter = w_gate_up.shape[1] // 2
    out = torch.zeros(x.shape[0], ids.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    for t, j in torch.cartesian_prod(torch.arange(x.shape[0]), torch.arange(ids.shape[1])).tolist():
        e = int(ids[t, j])
        gu = (w_gate_up[e].float() @ x[t].float()).to(x.dtype).float()
        g = gu[:inter]
        a = torch.nn.functional.silu(g) if activation == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
        h = (a * gu[inter:]).to(x.dtype).float()
        out[t, j] = ((w_down[e].float() @ h) * weights[t, j].float()).to(x.dtype)
    return out.sum(dim=1)
