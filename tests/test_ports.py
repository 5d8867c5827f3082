"""worker/ports.py: a port found free now is below the ephemeral range that port-0 binds and connections use."""

from __future__ import annotations

import socket

import pytest

from worker import ports


def test_a_free_port_binds_and_lies_below_the_ephemeral_range() -> None:
    for _ in range(20):
        port = ports.free_port()
        assert ports.LOWEST <= port < ports.ephemeral_start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_with_no_room_below_the_range_the_os_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "ephemeral_start", lambda: 1024)
    port = ports.free_port()
    assert port > 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
