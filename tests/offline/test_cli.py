"""`rlhf-ray sft` with bad data: one line naming the row, before Ray starts. (Real `sft` / `rm` runs:
e2e/test_offline_train.py; what a pipeline's SFT and reward model leave behind: e2e/test_pipeline_outputs.py.)"""
from __future__ import annotations

from rlhf_ray.cli import main


def test_bad_data_path_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    code = main(["sft", f"run.output_dir={tmp_path}", f"data.sft={bad}"])
    err = capsys.readouterr().err
    assert code == 1 and f"{bad}:2" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err  # one line that names the row
