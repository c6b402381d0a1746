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


def test_a_process_scratch_clears_the_folders_of_processes_that_are_gone(tmp_path):
    """Engines in Ray actors end without their `close` (ray.shutdown, kills): their /dev/shm folders were left
    behind run after run. The next engine on the node clears those whose process is gone, and only those."""
    import os
    import subprocess
    import sys
    from rlhf_ray.utils.folders import process_scratch
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    dead = tmp_path / f"rlhf_ray_adapters_{gone}_abc"
    live = tmp_path / f"rlhf_ray_adapters_{os.getppid()}_def"   # pytest's parent: running
    unnamed = tmp_path / "rlhf_ray_adapters_xyz"                 # no pid in its name: not ours to judge
    other = tmp_path / f"something_else_{gone}_abc"
    for d in (dead, live, unnamed, other):
        (d / "v1").mkdir(parents=True)
    mine = process_scratch(tmp_path, "rlhf_ray_adapters_")
    assert mine.is_dir() and mine.name.startswith(f"rlhf_ray_adapters_{os.getpid()}_")
    assert not dead.exists() and live.exists() and unnamed.exists() and other.exists()
