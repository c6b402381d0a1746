"""Shared-memory files that a group of processes leaves behind when it ends without removing them.

A tensor-parallel vLLM engine's core and workers keep their message queues and CPU all-reduce buffers as named
files in /dev/shm. Their shutdown removes them, unless a worker is killed before it gets there (vLLM's shutdown
ends a worker that does not exit in time): then they stay in memory until the machine restarts. Whoever ends
such a group can list what its processes map first and, once they are gone, remove what nobody maps any more.
"""
from __future__ import annotations

import os
from pathlib import Path

SHM = "/dev/shm/"


def descendants(pid: int) -> list[int]:
    """Every process below `pid`."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # ended meanwhile
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def mapped_by(pids) -> set[Path]:
    """The files in /dev/shm that these processes map and that still have a name."""
    found: set[Path] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                # address perms offset dev inode path: the path is the sixth field, spaces and all
                paths = (line.split(None, 5)[5].rstrip("\n") for line in maps if f" {SHM}" in line)
                found |= {Path(p) for p in paths if not p.endswith(" (deleted)")}
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return found


def remove_orphans(files) -> list[Path]:
    """Remove those of `files` that still exist and that no live process maps; returns them."""
    left = {Path(f) for f in files if Path(f).exists()}
    if left:
        left -= mapped_by(int(d) for d in os.listdir("/proc") if d.isdigit())
    for f in left:
        f.unlink(missing_ok=True)
    return sorted(left)
