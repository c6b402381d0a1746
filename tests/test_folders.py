"""The one atomic-folder rule (`rlhf_ray.utils.folders`): checkpoints, exports and sync restore points all use it."""
import pytest

from rlhf_ray.utils.folders import fresh_dir, swap_in, temp_dir_for


def test_a_written_folder_replaces_the_old_one_whole(tmp_path):
    final = tmp_path / "step_000002"
    assert temp_dir_for(final) == tmp_path / ".step_000002.tmp"
    for text in ("first", "second"):
        tmp = fresh_dir(temp_dir_for(final))
        (tmp / "f").write_text(text)
        assert swap_in(tmp, final) == final
        assert (final / "f").read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["step_000002"]


def test_a_crashed_write_leaves_the_old_folder_and_is_cleared_by_the_next(tmp_path):
    final = fresh_dir(tmp_path / "x")
    (final / "f").write_text("old")
    tmp = fresh_dir(temp_dir_for(final))
    (tmp / "half").write_text("...")          # a writer that died before swap_in
    assert (final / "f").read_text() == "old"
    assert list(fresh_dir(temp_dir_for(final)).iterdir()) == []  # the next write starts empty
    with pytest.raises(FileNotFoundError):
        swap_in(tmp_path / "missing", final)
    assert (final / "f").read_text() == "old"  # a failed swap keeps the old folder
