"""Where each checkpoint tensor goes in a model: one table that the loader checks names and shapes against
and the model runner copies by, derived from the model itself so no family writes it twice.

A parameter is its own checkpoint tensor unless the module owning it lists `checkpoint_slots`: stacked
parameters (q|k|v, gate|up, every expert of an MoE layer) take several checkpoint tensors, each a slice.
Under tensor parallelism a slot may also take only a slice of its checkpoint tensor (its `Shard`): the rows of
this rank's heads, the columns of its share of a row-parallel projection; loaders then read only that slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Shard:
    """The part of a checkpoint tensor one tensor-parallel rank holds: [start, stop) along `dim`, of `full`."""

    dim: int  # the dimension the tensor is split along
    start: int  # first index this rank holds
    stop: int  # one past the last
    full: int  # the checkpoint tensor's size along `dim`

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the whole tensor `t` (a view)."""
        return t.narrow(self.dim, self.start, self.stop - self.start)

    def index(self) -> tuple[slice, ...]:
        """The slice as an index (for readers that slice before reading, like safetensors' get_slice)."""
        return (slice(None),) * self.dim + (slice(self.start, self.stop),)


@dataclass(frozen=True)
class Slot:
    """One checkpoint tensor's place: `model_param[index]`, which takes `shard` of the tensor (all of it if None)."""

    param: str  # the model's parameter name
    index: tuple[int | slice, ...]  # () for the whole parameter
    shape: tuple[int, ...]  # the checkpoint tensor's shape (whole, not this rank's slice)
    shard: Shard | None = None  # the slice of the checkpoint tensor this rank holds; None: all of it


def checkpoint_layout(model: nn.Module) -> dict[str, Slot]:
    """Checkpoint name -> Slot for every tensor the model takes, in the model's parameter order."""
    params = dict(model.named_parameters())
    by_param: dict[str, list[tuple[str, Slot]]] = {}
    for prefix, module in model.named_modules():
        slots = getattr(module, "checkpoint_slots", None)
        if slots is None:
            continue
        pre = f"{prefix}." if prefix else ""
        entries = [(pre + ckpt, _slot(pre + p, index, tuple(params[pre + p][index].shape), shard))
                   for ckpt, p, index, shard in slots()]
        for _, slot in entries:
            by_param.setdefault(slot.param, entries)
    renames = getattr(model, "checkpoint_renames", ())
    layout: dict[str, Slot] = {}
    for name, p in params.items():
        entries = by_param.get(name) or [(name, Slot(name, (), tuple(p.shape)))]
        for ckpt, slot in entries:
            for ours, theirs in renames:
                ckpt = ckpt.replace(ours, theirs)
            layout.setdefault(ckpt, slot)
    return layout


def _slot(param: str, index: tuple[int | slice, ...], local: tuple[int, ...], shard: Shard | None) -> Slot:
    """A slot whose parameter slice has shape `local`: the checkpoint tensor is that, widened to `shard.full`."""
    if shard is None:
        return Slot(param, index, local)
    assert local[shard.dim] == shard.stop - shard.start, f"{param}: shard {shard} does not fit {local}"
    return Slot(param, index, (*local[: shard.dim], shard.full, *local[shard.dim + 1 :]), shard)
