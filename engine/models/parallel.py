"""Tensor-parallel layers (Megatron-LM, Shoeybi et al. 2019): each of N ranks holds 1/N of every large matrix.

    column-parallel   Y_r = X W_r^T             W's output rows split: rank r computes its own heads / MLP columns
    row-parallel      Y = sum_r X_r W_r^T + b   W's input columns split: each rank a partial sum, one all-reduce
    vocab-parallel    embedding and LM-head rows split by token id: masked lookups summed by an all-reduce,
                      each rank's logits gathered

A decoder layer talks twice: column-parallel QKV hands each rank whole heads, attention runs head by head, the
row-parallel O projection sums; column-parallel gate|up, the activation column by column, the row-parallel down
projection sums. Query heads split evenly, and so do KV heads; with fewer KV heads than ranks each rank keeps
the one KV head its query heads share (replicated on N / num_kv_heads ranks).

With one rank every layer is the plain layer: the same kernel call (ops.linear: GEMV or cuBLAS), no collective.
Every module says which slice of each checkpoint tensor its rank holds (`Shard`), so a rank reads only that.
The `*_ref` functions compute the sharded arithmetic of N ranks in one process: the torch twins the layers are
tested against (tests/test_tp_layers.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ConfigError, ModelConfig
from engine.models import ops
from engine.models.checkpoint import Shard
from engine.parallel.group import TPGroup, current

# (checkpoint name relative to the module, parameter name relative to it, index into the parameter, the slice of
# the checkpoint tensor this rank holds or None for all of it)
Slots = list[tuple[str, str, tuple[int | slice, ...], Shard | None]]


def even_split(total: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of rank's equal share of `total` (which the ranks divide)."""
    per = total // size
    return rank * per, (rank + 1) * per


def kv_head_range(num_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """The model's KV heads rank holds: an equal share, or with fewer KV heads than ranks the one its query heads
    share (query heads split evenly, so rank r's all fall in KV group r * num_kv_heads // size)."""
    if num_kv_heads >= size:
        return even_split(num_kv_heads, rank, size)
    h = rank * num_kv_heads // size
    return h, h + 1


def check_divisible(cfg: ModelConfig, size: int) -> None:
    """ConfigError unless `size` ranks can split this model: heads, KV heads, MLP and expert widths."""
    need = [("num_heads", cfg.num_heads), ("intermediate_size", cfg.intermediate_size)]
    if cfg.moe is not None:
        need.append(("moe.intermediate_size", cfg.moe.intermediate_size))
        if cfg.moe.shared_expert_intermediate_size:
            need.append(("moe.shared_expert_intermediate_size", cfg.moe.shared_expert_intermediate_size))
    bad = [f"{name} {n}" for name, n in need if n % size]
    kv = cfg.num_kv_heads
    if kv % size and size % kv:
        bad.append(f"num_kv_heads {kv} (neither a multiple nor a divisor of {size})")
    if bad:
        raise ConfigError(f"tensor_parallel_size {size} does not divide the model: {', '.join(bad)}")


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor stacked in a column-parallel weight: it has `full` rows, this rank holds [start, stop)."""

    full: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b for this rank's rows of W: the rows of each stacked part (q|k|v, gate|up), no communication."""

    def __init__(self, input_size: int, parts: Sequence[Part], bias: bool) -> None:
        super().__init__()
        self.parts = tuple(parts)
        rows = sum(p.rows for p in self.parts)
        self.weight = nn.Parameter(torch.empty(rows, input_size))
        self.bias = nn.Parameter(torch.empty(rows)) if bias else None

    def stacked_slots(self, names: Sequence[str], param: str) -> Slots:
        """Slots of the owning module: checkpoint tensor `names[i]` (weight, bias) -> part i of `param`."""
        kinds = ("weight", "bias") if self.bias is not None else ("weight",)
        slots, at = [], 0
        for name, p in zip(names, self.parts, strict=True):
            shard = None if p.rows == p.full else Shard(0, p.start, p.stop, p.full)
            slots += [(f"{name}.{kind}", f"{param}.{kind}", (slice(at, at + p.rows),), shard) for kind in kinds]
            at += p.rows
        return slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T + b: this rank holds input columns `in_range` of W; the partial sums are all-reduced
    (unless `reduce` is False: the caller reduces a sum of several partial outputs once), then the bias added."""

    def __init__(self, input_size: int, output_size: int, bias: bool, in_range: tuple[int, int] | None = None,
                 reduce: bool = True) -> None:
        super().__init__()
        self.tp: TPGroup = current()
        start, stop = in_range or even_split(input_size, self.tp.rank, self.tp.size)
        assert reduce or not bias, "a bias is added once, after the reduction"
        self.weight = nn.Parameter(torch.empty(output_size, stop - start))
        self.bias = nn.Parameter(torch.empty(output_size)) if bias else None
        self.shard = None if stop - start == input_size else Shard(1, start, stop, input_size)
        self.reduce = reduce

    def checkpoint_slots(self) -> Slots:
        slots: Slots = [("weight", "weight", (), self.shard)]
        return slots + [("bias", "bias", (), None)] if self.bias is not None else slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return ops.linear(x, self.weight, self.bias)
        y = ops.linear(x, self.weight)
        if self.reduce:
            self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embeddings; rank r holds rows [r * P, r * P + P) of the table, P = ceil(vocab / N) (the last rank's
    padding rows are zero). An id outside a rank's rows looks up zeros there; the all-reduce adds the one real row
    to zeros, so the result is exactly the whole table's row."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.tp: TPGroup = current()
        per = -(-num_embeddings // self.tp.size)
        self.num_embeddings = num_embeddings
        self.start = min(self.tp.rank * per, num_embeddings)  # first token id this rank holds
        self.num_real = min(per, num_embeddings - self.start)  # rows past it are padding
        self.weight = nn.Parameter(torch.empty(per, dim))

    def checkpoint_slots(self) -> Slots:
        if self.tp.size == 1:
            return [("weight", "weight", (), None)]
        shard = Shard(0, self.start, self.start + self.num_real, self.num_embeddings)
        return [("weight", "weight", (slice(0, self.num_real),), shard)]

    def zero_padding(self) -> None:
        """Rows past the vocabulary (the last rank's) hold zeros: their logits are cut off, never garbage."""
        with torch.no_grad():
            self.weight[self.num_real :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.num_real)
        out = F.embedding(torch.where(inside, local, 0), self.weight).masked_fill(~inside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection [vocab, hidden], its rows split by token id like the embedding's; `gather_logits`
    joins the ranks' logits."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise TypeError("the LM head projects hidden states: CausalLM.compute_logits")


def gather_logits(local: torch.Tensor, vocab_size: int, tp: TPGroup) -> torch.Tensor:
    """[T, vocab]: every rank's logits of its token ids [T, P], joined in id order, padding cut off."""
    if tp.size == 1:
        return local
    parts = tp.all_gather(local)  # [N, T, P]
    return parts.permute(1, 0, 2).reshape(local.shape[0], -1)[:, :vocab_size]


# ---- torch twins: N ranks' arithmetic in one process --------------------------------------------------------------
def column_parallel_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, size: int
                        ) -> list[torch.Tensor]:
    """Each rank's output of a column-parallel layer (a single part): rank r's rows of W."""
    outs = []
    for r in range(size):
        a, b = even_split(weight.shape[0], r, size)
        outs.append(F.linear(x, weight[a:b], None if bias is None else bias[a:b]))
    return outs


def row_parallel_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, size: int) -> torch.Tensor:
    """A row-parallel layer: the partial products of every rank's input columns, summed in rank order, + bias."""
    total = None
    for r in range(size):
        a, b = even_split(weight.shape[1], r, size)
        part = F.linear(x[..., a:b], weight[:, a:b])
        total = part if total is None else total + part
    assert total is not None
    return total if bias is None else total + bias


def vocab_parallel_embedding_ref(ids: torch.Tensor, weight: torch.Tensor, size: int) -> torch.Tensor:
    """Every rank's masked lookup in its rows of the table, summed."""
    per = -(-weight.shape[0] // size)
    total = torch.zeros(*ids.shape, weight.shape[1], dtype=weight.dtype)
    for r in range(size):
        rows = weight[r * per : (r + 1) * per]
        local = ids - r * per
        inside = (local >= 0) & (local < rows.shape[0])
        total += F.embedding(torch.where(inside, local, 0), rows).masked_fill(~inside.unsqueeze(-1), 0)
    return total


def vocab_parallel_logits_ref(hidden: torch.Tensor, weight: torch.Tensor, size: int) -> torch.Tensor:
    """Every rank's logits of its rows of the LM head, joined."""
    per = -(-weight.shape[0] // size)
    return torch.cat([F.linear(hidden, weight[r * per : (r + 1) * per]) for r in range(size)], dim=-1)
