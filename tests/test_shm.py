"""rlhf_ray.utils.shm: what a group of processes leaves in /dev/shm is found and, once nobody maps it, removed
(a TP engine's close uses it: roles/generator/test_engine_close.py)."""
import os
import signal
import uuid
from pathlib import Path

from shm_holder import hold

from rlhf_ray.utils.shm import descendants, mapped_by, remove_orphans


def test_a_killed_holders_file_is_found_then_removed_and_a_live_ones_kept():
    dead, live = (Path(f"/dev/shm/rlhf_ray_test_{uuid.uuid4().hex}") for _ in range(2))
    a, b = hold(dead), hold(live)
    try:
        assert a.pid in descendants(os.getpid())
        held = mapped_by([a.pid, b.pid])
        assert {dead, live} <= held
        a.send_signal(signal.SIGKILL)
        a.wait()
        assert dead.exists()  # killed: nothing removed it
        assert remove_orphans(held) == [dead]
        assert not dead.exists() and live.exists()  # the live holder's file stays
    finally:
        for p in (a, b):
            p.kill()
            p.wait()
        for f in (dead, live):
            f.unlink(missing_ok=True)


def test_nothing_to_remove_when_no_file_is_left():
    assert remove_orphans([Path("/dev/shm/rlhf_ray_test_never_made")]) == []
    assert remove_orphans([]) == []
