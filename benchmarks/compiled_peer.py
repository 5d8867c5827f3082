"""The compiled one-file decode peer: Llama-3-8B's shape written the gpt-fast way (a static KV cache of the
context's length, plain torch ops, `torch.compile(mode="reduce-overhead", fullgraph=True)`: inductor kernels
replayed from a CUDA graph), dummy bf16 weights. The engine's decode step is compared with it in the same run.

    python -m benchmarks.compiled_peer [--batches 1,64] [--context 512] [--out DIR]

Per batch size: ms per decode step (embedding, 32 layers, LM head, greedy argmax: what the engine's step also
computes on the device), the median of `--iters` steps timed with CUDA events after the compile and a warm-up,
against the HBM floor of benchmarks/gpu_bench.py (weights without the input-embedding table + the KV read) / the
same run's copy rate. The compile time is printed too: it is what a user of this style pays per batch shape.
GPU only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
import torch.nn.functional as F

from benchmarks.gpu_bench import LLAMA3_8B, bench_ms, ceilings, weight_bytes


class Peer(torch.nn.Module):
    """Llama with fused QKV and gate/up weights and a static [layers, B, kv_heads, S, head_dim] cache."""

    def __init__(self, batch: int, seq: int) -> None:
        super().__init__()
        c = LLAMA3_8B
        d, i, hd, kv = c.hidden_size, c.intermediate_size, c.head_dim, c.num_kv_heads * c.head_dim
        p = dict(dtype=torch.bfloat16, device="cuda")
        r = lambda *s: torch.nn.Parameter(torch.randn(*s, **p) * 0.02, requires_grad=False)  # noqa: E731
        self.embed, self.lm_head = r(c.vocab_size, d), r(c.vocab_size, d)
        self.wqkv = torch.nn.ParameterList(r(d + 2 * kv, d) for _ in range(c.num_layers))
        self.wo = torch.nn.ParameterList(r(d, d) for _ in range(c.num_layers))
        self.w13 = torch.nn.ParameterList(r(2 * i, d) for _ in range(c.num_layers))
        self.w2 = torch.nn.ParameterList(r(d, i) for _ in range(c.num_layers))
        self.norms = torch.nn.Parameter(torch.ones(2 * c.num_layers + 1, d, **p), requires_grad=False)
        shape = (c.num_layers, batch, c.num_kv_heads, seq, hd)
        self.register_buffer("k_cache", torch.randn(shape, **p) * 0.1)
        self.register_buffer("v_cache", torch.randn(shape, **p) * 0.1)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, device="cuda").float() / hd))
        ang = torch.outer(torch.arange(seq, device="cuda").float(), inv)
        self.register_buffer("cos", ang.cos())
        self.register_buffer("sin", ang.sin())
        self.seq = seq

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a, b = x.float().chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1], pos [1] (the position every row writes: one shared context length) -> next tokens [B, 1]."""
        c = LLAMA3_8B
        B, hd, nh, nkv = tokens.shape[0], c.head_dim, c.num_heads, c.num_kv_heads
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[pos], self.sin[pos]
        mask = (torch.arange(self.seq, device=x.device) <= pos).view(1, 1, 1, self.seq)
        for li in range(c.num_layers):
            h = F.rms_norm(x, (x.shape[-1],), self.norms[2 * li], 1e-5)
            q, k, v = (h @ self.wqkv[li].T).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q = self.rope(q.view(B, 1, nh, hd), cos, sin).transpose(1, 2)
            k = self.rope(k.view(B, 1, nkv, hd), cos, sin).transpose(1, 2)
            self.k_cache[li].index_copy_(2, pos, k)
            self.v_cache[li].index_copy_(2, pos, v.view(B, 1, nkv, hd).transpose(1, 2))
            a = F.scaled_dot_product_attention(q, self.k_cache[li], self.v_cache[li], attn_mask=mask, enable_gqa=True)
            x = x + a.transpose(1, 2).reshape(B, 1, nh * hd) @ self.wo[li].T
            h = F.rms_norm(x, (x.shape[-1],), self.norms[2 * li + 1], 1e-5)
            g, u = (h @ self.w13[li].T).chunk(2, dim=-1)
            x = x + (F.silu(g) * u) @ self.w2[li].T
        x = F.rms_norm(x, (x.shape[-1],), self.norms[-1], 1e-5)
        return (x @ self.lm_head.T).argmax(dim=-1)


def run(batch: int, context: int, copy_tb_s: float, iters: int) -> dict:
    peer = Peer(batch, context + 16)
    step = torch.compile(peer, mode="reduce-overhead", fullgraph=True)
    tokens = torch.randint(1000, 100000, (batch, 1), device="cuda")
    pos = torch.tensor([context], device="cuda")
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(3):  # compile, record the graph, replay
            tokens = step(tokens, pos).clone()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        ms = bench_ms(lambda: step(tokens, pos), warmup=5, iters=iters)
    kv_per_token = 2 * LLAMA3_8B.num_layers * LLAMA3_8B.num_kv_heads * LLAMA3_8B.head_dim * 2
    floor = (weight_bytes(LLAMA3_8B, batch) + batch * (context + 16) * kv_per_token) / (copy_tb_s * 1e12) * 1e3
    return {"batch": batch, "ctx": context, "ms_step": round(ms, 3), "tok_s": round(batch / ms * 1e3, 1),
            "floor_ms": round(floor, 3), "floor_ratio": round(ms / floor, 3), "compile_s": round(compile_s, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64", help="decode batch sizes (one compile each)")
    ap.add_argument("--context", type=int, default=512, help="tokens cached per sequence (default 512)")
    ap.add_argument("--iters", type=int, default=50, help="timed steps per batch size (median reported)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"), help="folder for compiled_peer.json")
    a = ap.parse_args(argv)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ceilings": ceilings()}
    res["decode"] = []
    for b in (int(x) for x in a.batches.split(",")):
        res["decode"].append(run(b, a.context, res["ceilings"]["copy_tb_s"], a.iters))
        print("peer", res["decode"][-1], flush=True)
        torch._dynamo.reset()  # drop the compiled graph and its static buffers before the next batch size
        gc.collect()
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "compiled_peer.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
