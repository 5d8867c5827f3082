"""A sparse mixture-of-experts feed-forward (Shazeer et al. 2017; Switch, GShard; as Mixtral and Qwen-MoE use it).

    p = softmax(W_router x)                        one probability per expert
    S = top-k(p)                                   the k experts this token goes to
    y = sum_{e in S} w_e * down_e(act(gate_e(x)) * up_e(x))
    w_e = p_e / sum_{j in S} p_j   (norm_topk_prob: Mixtral, Qwen3-MoE)   or   w_e = p_e   (Qwen2-MoE)
    y += sigmoid(g . x) * SharedExpert(x)         only where the config has a shared expert (Qwen2-MoE)

Expert weights are stacked ([E, 2I, H] gate|up, [E, H, I] down) so a GPU runs each projection of every expert
as one grouped GEMM over the tokens sorted by expert (engine/kernels/moe.py); checkpoints keep one tensor per
expert, and `checkpoint_slots` says where each goes. Under tensor parallelism every rank holds every expert's
share of the inner columns (and the router whole): experts and shared expert each give a partial sum, reduced once.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig
from engine.models import ops
from engine.models.checkpoint import Shard
from engine.models.layers import GatedMLP, Slots
from engine.models.parallel import even_split
from engine.parallel.group import current

HF_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")  # how checkpoints name an expert's gate, up and down


class Experts(nn.Module):
    """num_experts gated MLPs of inner width I, stored stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    (I being this rank's share of the inner columns under tensor parallelism)."""

    def __init__(self, num_experts: int, hidden_size: int, inter: int, names: tuple[str, str, str]) -> None:
        super().__init__()
        tp = current()
        start, stop = even_split(inter, tp.rank, tp.size)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * (stop - start), hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, stop - start))
        self.inter, self.names = stop - start, names
        whole = stop - start == inter
        self.rows = None if whole else Shard(0, start, stop, inter)  # of each expert's gate and up
        self.cols = None if whole else Shard(1, start, stop, inter)  # of each expert's down

    def checkpoint_slots(self) -> Slots:
        gate, up, down = self.names
        n, inter = self.gate_up_proj.shape[0], self.inter
        return [slot for e in range(n) for slot in (
            (f"{e}.{gate}.weight", "gate_up_proj", (e, slice(0, inter)), self.rows),
            (f"{e}.{up}.weight", "gate_up_proj", (e, slice(inter, 2 * inter)), self.rows),
            (f"{e}.{down}.weight", "down_proj", (e,), self.cols),
        )]


class SparseMoE(nn.Module):
    """Router (`gate`), routed experts and the optional sigmoid-gated shared expert."""

    def __init__(self, cfg: ModelConfig, names: tuple[str, str, str] = HF_EXPERT_NAMES) -> None:
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.gate = nn.Linear(cfg.hidden_size, moe.num_experts, bias=False)  # the router
        self.experts = Experts(moe.num_experts, cfg.hidden_size, moe.intermediate_size, names)
        shared = moe.shared_expert_intermediate_size
        self.shared_expert = GatedMLP(cfg.hidden_size, shared, cfg.hidden_act, reduce=False) if shared else None
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if shared else None
        self.top_k, self.normalize, self.act = moe.num_experts_per_tok, moe.norm_topk_prob, cfg.hidden_act
        self.tp = current()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = ops.moe_route(ops.linear(x, self.gate.weight), self.top_k, self.normalize)
        y = ops.fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids, self.act)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            y = y + torch.sigmoid(ops.linear(x, self.shared_expert_gate.weight)) * self.shared_expert(x)
        return self.tp.all_reduce(y) if self.tp.size > 1 else y


def feed_forward(cfg: ModelConfig, layer: int, names: tuple[str, str, str] = HF_EXPERT_NAMES) -> nn.Module:
    """The layer's feed-forward: a sparse MoE, or a dense gated MLP (dense models, MoE models' dense layers)."""
    if cfg.moe is not None and layer not in cfg.moe.dense_layers:
        return SparseMoE(cfg, names)
    return GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
