"""engine/kv_progress.py on its device path (CUDA events), run on the CPU with events the test completes: progress
counts only once a layer's event has landed, in order, and the queued events stay bounded when nobody reads
(a prefill worker without layer-wise streaming once held one event per layer per prompt step for ever)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from engine.kv_progress import LayerProgress

LAYERS = 4


class Event:
    """A CUDA event stand-in: it has landed once the test says the device got that far."""

    landed_upto = 0  # events with a sequence number below this have completed
    made = 0

    def __init__(self) -> None:
        self.seq = Event.made
        Event.made += 1

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return self.seq < Event.landed_upto


def setup() -> tuple[LayerProgress, nn.Sequential]:
    Event.landed_upto, Event.made = 0, 0
    layers = nn.Sequential(*[nn.Identity() for _ in range(LAYERS)])
    prog = LayerProgress(LAYERS, torch.device("cpu"), new_event=Event)
    prog.attach(list(layers))
    return prog, layers


def step(prog: LayerProgress, layers: nn.Sequential, rid: str, computed: int, new: int, prompt: int = 64) -> None:
    req = SimpleNamespace(request_id=rid, lease_s=60.0, num_computed_tokens=computed, num_prompt_tokens=prompt)
    prog.begin(SimpleNamespace(scheduled=[SimpleNamespace(request=req, num_new_tokens=new)]))
    layers(torch.zeros(1))
    prog.end()


def test_progress_counts_a_layer_once_its_event_has_landed() -> None:
    prog, layers = setup()
    step(prog, layers, "a", 0, 16)
    assert prog.layer_tokens("a") == (0,) * LAYERS  # queued on the device, nothing landed
    Event.landed_upto = 2  # the first two layers' kernels have run
    assert prog.layer_tokens("a") == (16, 16, 0, 0)
    Event.landed_upto = LAYERS
    assert prog.layer_tokens("a") == (16,) * LAYERS
    step(prog, layers, "a", 16, 16)
    Event.landed_upto = LAYERS + 1
    assert prog.layer_tokens("a") == (32, 16, 16, 16)


def test_events_do_not_pile_up_without_a_reader() -> None:
    prog, layers = setup()
    for i in range(200):  # chunks of prompts that nobody watches; the device keeps up, one step behind at most
        rid = f"r{i // 4}"
        step(prog, layers, rid, (i % 4) * 16, 16)
        Event.landed_upto = Event.made - LAYERS  # the latest step is still on the device
        if i % 4 == 3:
            prog.forget(rid)
    assert prog.num_queued <= 2 * LAYERS
