"""Reading rows: formats, schemas, and malformed rows named by file and row (or skipped and counted)."""
from __future__ import annotations

import json

import pytest

from rlhf_ray.data.readers import DataError, read_rows


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_sft_and_messages(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [
        {"prompt": "p1", "response": "r1", "extra": 3},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ])
    rows, stats = read_rows(p, "sft")
    assert rows[0]["prompt"] == "p1" and rows[0]["response"] == "r1"
    assert rows[1]["prompt"] == [{"role": "user", "content": "hi"}] and rows[1]["response"] == "yo"
    assert rows[1]["_where"] == f"{p}:2" and stats.rows == 2 and stats.skipped == 0


@pytest.mark.parametrize("bad, why", [
    ({"prompt": "p"}, "'response' must be a string"),
    ({"prompt": "p", "response": "   "}, "'response' is empty"),
    ("{not json", "not valid JSON"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "must end with an assistant turn"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad, why):
    p = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, bad])
    with pytest.raises(DataError) as e:
        read_rows(p, "sft")
    assert f"{p}:2" in str(e.value) and why in str(e.value)


def test_skip_mode_counts_bad_rows(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "a", "chosen": "x"}])
    rows, stats = read_rows(p, "preferences", on_bad_row="skip")
    assert len(rows) == 1 and stats.skipped == 1 and f"{p}:2" in stats.reasons[0]


def test_preference_conversations_must_share_the_prompt(tmp_path):
    u = {"role": "user", "content": "q"}
    ok = {"chosen": [u, {"role": "assistant", "content": "good"}], "rejected": [u, {"role": "assistant", "content": "bad"}]}
    bad = {"chosen": ok["chosen"], "rejected": [{"role": "user", "content": "other"}, ok["rejected"][1]]}
    rows, _ = read_rows(_jsonl(tmp_path / "ok.jsonl", [ok]), "preferences")
    assert rows[0]["chosen"] == "good" and rows[0]["prompt"] == [u]
    with pytest.raises(DataError, match="differ before the final assistant turn"):
        read_rows(_jsonl(tmp_path / "bad.jsonl", [bad]), "preferences")


def test_parquet_and_datasets_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"prompt": ["a", "b"], "response": ["x", None]})
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet row 1: malformed sft row"):
        read_rows(tmp_path / "d.parquet", "sft")
    folder = tmp_path / "ds"  # the layout of `datasets.Dataset.save_to_disk`
    folder.mkdir()
    good = pa.table({"prompt": ["a", "b"]})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, good.schema) as writer:
        writer.write_table(good)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    rows, _ = read_rows(folder, "prompts")
    assert [r["prompt"] for r in rows] == ["a", "b"]


def test_unknown_format_and_missing_path(tmp_path):
    (tmp_path / "d.csv").write_text("prompt\n")
    with pytest.raises(DataError, match="unknown data format"):
        read_rows(tmp_path / "d.csv", "prompts")
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl", "prompts")


def test_a_line_that_is_not_utf8_is_named_or_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "a", "response": "b"}\n' + '{"prompt": "caf\xe9", "response": "b"}\n'.encode("latin-1")
                  + b'{"prompt": "c", "response": "d"}\n')
    with pytest.raises(DataError) as e:
        read_rows(p, "sft")
    assert f"{p}:2" in str(e.value) and "not valid UTF-8 (byte 0xe9 at column 16)" in str(e.value)
    rows, stats = read_rows(p, "sft", on_bad_row="skip")  # the lines after it are still read
    assert [r["prompt"] for r in rows] == ["a", "c"] and stats.skipped == 1 and f"{p}:2" in stats.reasons[0]
