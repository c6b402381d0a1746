"""RL checkpoints are trusted only when intact: damaged ones fall back, failed writes keep the previous one."""
from __future__ import annotations

import errno
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from rlhf_ray.learner import checkpoint as ck
from rlhf_ray.rl import checkpoint as rl_ck


class FakeRoles:
    """Writes a weight file per save and records what it loaded."""

    def __init__(self, fail_with: Exception | None = None):
        self.fail_with, self.loaded = fail_with, []

    def save(self, path: str) -> None:
        (Path(path) / "policy").mkdir()
        (Path(path) / "policy" / "weights.bin").write_bytes(bytes(range(256)) * 64)
        if self.fail_with is not None:  # the disk fills up after the first file
            raise self.fail_with

    def load(self, path: str) -> None:
        assert (Path(path) / "policy" / "weights.bin").read_bytes() == bytes(range(256)) * 64
        self.loaded.append(Path(path).name)


def _two_checkpoints(root: Path) -> FakeRoles:
    roles = FakeRoles()
    for step in (3, 6):
        rl_ck.save(roles, root, step, {"step": step})
    return roles


def test_intact_checkpoint_loads_and_matches_its_manifest(tmp_path):
    roles = _two_checkpoints(tmp_path)
    assert ck.damage(tmp_path / "step_000006") is None
    ckpt, state = rl_ck.load(roles, tmp_path)
    assert ckpt.name == "step_000006" and state == {"step": 6} and roles.loaded == ["step_000006"]


@pytest.mark.parametrize("harm,says", [
    (lambda f: f.write_bytes(f.read_bytes()[:100]), "has 100 bytes"),
    (lambda f: f.write_bytes(b"\0" * f.stat().st_size), "does not match the checksum"),
    (lambda f: f.unlink(), "is missing"),
])
def test_damaged_checkpoint_marked_complete_falls_back_to_the_previous(tmp_path, harm, says):
    roles = _two_checkpoints(tmp_path)
    harm(tmp_path / "step_000006" / "policy" / "weights.bin")
    assert says in ck.damage(tmp_path / "step_000006")
    notes = []
    ckpt, state = rl_ck.load(roles, tmp_path, note=notes.append)
    assert ckpt.name == "step_000003" and state["step"] == 3 and roles.loaded == ["step_000003"]
    assert len(notes) == 1 and "step_000006" in notes[0] and says in notes[0]


def test_every_checkpoint_damaged_stops_with_one_line(tmp_path):
    roles = _two_checkpoints(tmp_path)
    for step in ("step_000003", "step_000006"):
        (tmp_path / step / "controller.json").write_text("{}")
    with pytest.raises(ck.CheckpointError, match="no checkpoint under .* can be loaded .*step_000006.*step_000003"):
        rl_ck.load(roles, tmp_path, note=lambda _: None)
    assert rl_ck.load(roles, tmp_path / "none") is None


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    roles = _two_checkpoints(tmp_path)
    full = FakeRoles(fail_with=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(ck.CheckpointError, match=r"step 9 could not be written \(OSError: .*No space left on device\); "
                                                 r"the previous checkpoint .*step_000006 is intact"):
        rl_ck.save(full, tmp_path, 9, {"step": 9})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000006"]  # no partial folder left
    ckpt, _ = rl_ck.load(roles, tmp_path)
    assert ckpt.name == "step_000006" and ck.damage(ckpt) is None


def test_rng_state_round_trips_through_json(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    import numpy as np
    np.random.seed(1)
    ck.save_rng(tmp_path / "rng.json")
    json.loads((tmp_path / "rng.json").read_text())  # plain JSON: nothing to unpickle
    expected = (random.random(), torch.rand(3), np.random.rand())
    random.seed(2), torch.manual_seed(2), np.random.seed(2)
    ck.load_rng(tmp_path / "rng.json")
    got = (random.random(), torch.rand(3), np.random.rand())
    assert got[0] == expected[0] and torch.equal(got[1], expected[1]) and got[2] == expected[2]


def test_publish_leaves_a_manifest_of_every_file(tmp_path):
    tmp = ck.temp_dir_for(tmp_path / "x")
    (tmp / "a").mkdir(parents=True)
    (tmp / "a" / "w.bin").write_bytes(b"123")
    ck.publish(tmp, tmp_path / "x")
    manifest = json.loads((tmp_path / "x" / ck.MANIFEST).read_text())
    assert list(manifest) == ["a/w.bin"] and manifest["a/w.bin"][0] == 3
    shutil.rmtree(tmp_path / "x")
