"""Where each checkpoint tensor goes in a model: one table that the loader checks names and shapes against
and the model runner copies by, derived from the model itself so no family writes it twice.

A parameter is its own checkpoint tensor unless the module owning it lists `checkpoint_slots`: stacked
parameters (q|k|v, gate|up, every expert of an MoE layer) take several checkpoint tensors, each a slice.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Slot:
    """One checkpoint tensor's place: `model_param[index]`, which has `shape`."""

    param: str  # the model's parameter name
    index: tuple[int | slice, ...]  # () for the whole parameter
    shape: tuple[int, ...]  # the checkpoint tensor's shape


def checkpoint_layout(model: nn.Module) -> dict[str, Slot]:
    """Checkpoint name -> Slot for every tensor the model takes, in the model's parameter order."""
    params = dict(model.named_parameters())
    by_param: dict[str, list[tuple[str, Slot]]] = {}
    for prefix, module in model.named_modules():
        slots = getattr(module, "checkpoint_slots", None)
        if slots is None:
            continue
        pre = f"{prefix}." if prefix else ""
        entries = [(pre + ckpt, Slot(pre + p, index, tuple(params[pre + p][index].shape))) for ckpt, p, index in slots()]
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
