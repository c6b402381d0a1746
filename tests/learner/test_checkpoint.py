"""Checkpoint folders are atomic: incomplete ones are never picked, replacing keeps a complete one."""
from __future__ import annotations

import pytest

from rlhf_ray.learner import checkpoint
from rlhf_ray.learner.ds_config import lr_lambda


def _write(tmp, text):
    tmp.mkdir(parents=True)
    (tmp / "state.bin").write_text(text)


def test_incomplete_checkpoints_are_ignored(tmp_path):
    _write(tmp_path / "step_000010", "ten")
    (tmp_path / "step_000010" / checkpoint.MARKER).write_text("ok\n")
    _write(tmp_path / "step_000020", "twenty, crashed before the marker")
    _write(checkpoint.temp_dir_for(tmp_path / "step_000030"), "crashed mid-write")
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step_000010"
    assert checkpoint.latest_checkpoint(tmp_path / "missing") is None


def test_publish_is_all_or_nothing(tmp_path, monkeypatch):
    final = tmp_path / "step_000005"
    tmp = checkpoint.temp_dir_for(final)
    _write(tmp, "v1")
    checkpoint.publish(tmp, final)
    assert checkpoint.is_complete(final) and (final / "state.bin").read_text() == "v1"
    _write(tmp, "v2")

    def crash(_path):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "fsync_tree", crash)  # a crash before the marker is written
    with pytest.raises(OSError):
        checkpoint.publish(tmp, final)
    assert (final / "state.bin").read_text() == "v1" and checkpoint.is_complete(final)
    assert not checkpoint.is_complete(tmp)
    monkeypatch.undo()
    checkpoint.publish(tmp, final)
    assert (final / "state.bin").read_text() == "v2" and not tmp.exists()


def test_lr_schedules():
    assert [lr_lambda("constant", 2, 10)(s) for s in (0, 1, 2, 9)] == pytest.approx([1 / 3, 2 / 3, 1, 1])
    lin = lr_lambda("linear", 0, 10)
    assert lin(0) == 1 and lin(5) == pytest.approx(0.5) and lin(10) == 0
    cos = lr_lambda("cosine", 0, 10)
    assert cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0)
