"""KV transfer between workers of different tensor-parallel sizes: the handshake's layouts on the wire, and the
rule that a pull never moves part of a request's heads."""

from __future__ import annotations

import pytest

from decode_worker.kv_pull import KVUnmappable, check_mappable
from engine.parallel.kv_heads import KVHeadLayout
from proto.convert import kv_heads_from_proto, kv_heads_to_proto


def smollm2(tp: int) -> KVHeadLayout:
    return KVHeadLayout.of(3, tp, 30, 16, 64, "float32", 100)


@pytest.mark.parametrize("tp", [1, 2, 3, 6])
def test_kv_head_layout_crosses_the_wire(tp: int) -> None:
    layout = KVHeadLayout.of(3 if tp != 2 else 2, tp, 30, 16, 64, "bfloat16", 77)
    assert kv_heads_from_proto(kv_heads_to_proto(layout)) == layout


def test_a_truncated_layout_is_refused() -> None:
    m = kv_heads_to_proto(smollm2(3))
    del m.heads[-1]
    with pytest.raises(ValueError, match="cover"):
        kv_heads_from_proto(m)


def test_guard_refuses_a_peer_that_does_not_describe_its_ranks() -> None:
    with pytest.raises(KVUnmappable, match="does not describe"):
        check_mappable(smollm2(1), None, "prefill-0")


@pytest.mark.parametrize("local, remote", [(1, 3), (3, 1), (2, 2)])
def test_guard_refuses_tensor_parallel_pairs_the_transfer_cannot_map(local: int, remote: int) -> None:
    """Equal sizes included: rank 0's shards agree field for field, yet a pull through rank 0's agent alone would
    move a third (a half) of the heads."""
    lay = (lambda tp: KVHeadLayout.of(2, tp, 30, 16, 64, "float32", 100)) if 2 in (local, remote) else smollm2
    with pytest.raises(KVUnmappable, match="tensor-parallel"):
        check_mappable(lay(local), lay(remote), "prefill-0")
    check_mappable(lay(1), lay(1), "prefill-0")
