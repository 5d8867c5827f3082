"""Free TCP ports for a process that is told its port now and binds it later (a cluster's router and workers, a
Ray head's services, test clusters).

A port the OS hands out for a bind to port 0 comes from the ephemeral range (Linux:
/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default), the range every outgoing connection and every
other port-0 bind also draws from: between being found free and being bound, such a port can be taken by another
process's connection (a CI run's Ray deployment failed so, its router port "Address already in use"). `free_port`
therefore picks below that range, where only explicit binds land, and checks that the port binds now.
"""

from __future__ import annotations

import random
import socket

LOWEST = 20_000  # below: commonly configured service ports, and Ray's worker ports (10002-19999 by default)
TRIES = 64
RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def ephemeral_start() -> int:
    """The first port of the OS's ephemeral range (32768, Linux's default, where it cannot be read)."""
    try:
        with open(RANGE_FILE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port that binds on `host` now, below the ephemeral range when there is room there (else the OS's pick)."""
    top = ephemeral_start()
    for _ in range(TRIES if top - LOWEST > 1000 else 0):
        port = random.randrange(LOWEST, top)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
