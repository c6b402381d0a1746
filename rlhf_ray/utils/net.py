"""The one free-port helper (rendezvous ports for torch.distributed, collective groups, test servers)."""
from __future__ import annotations

import random
import socket

# Ray's workers take ports 10002-19999 and every other Ray process binds port 0, i.e. the kernel's ephemeral
# range. A port picked from the ephemeral range is free now but can be handed to one of those processes before
# our server binds it (CI saw Serve's proxy fail to bind so). Picking from the gap between the two ranges leaves
# only our own picks to collide, and those are random.
_RAY_WORKER_PORTS = (10002, 19999)
_RNG = random.SystemRandom()  # not the global generator: runs seed that one, and every process would pick alike


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "") -> int:
    """A TCP port free on `host` at the time of the call ("" = every interface, as a rendezvous binds),
    outside the ranges Ray and the kernel hand out on their own."""
    low, high = _RAY_WORKER_PORTS[1] + 1, _ephemeral_range()[0] - 1
    candidates = _RNG.sample(range(low, high + 1), min(64, high - low + 1)) if high > low else []
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # the gap is full or absent: any free port
        s.bind((host, 0))
        return s.getsockname()[1]


def node_address() -> tuple[str, int]:
    """This Ray node's IP and a free port on it: where a rendezvous (DeepSpeed's, a weight broadcast's) meets."""
    import ray
    return ray.util.get_node_ip_address(), free_port()
