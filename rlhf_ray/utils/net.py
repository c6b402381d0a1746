"""The one free-port helper (rendezvous ports for torch.distributed, collective groups, test servers)."""
from __future__ import annotations

import socket


def free_port(host: str = "") -> int:
    """A TCP port free on `host` at the time of the call ("" = every interface, as a rendezvous binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
