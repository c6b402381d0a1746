"""Read rows from JSONL / parquet / a `datasets.save_to_disk` folder and check them against a schema.

Row schemas (kind -> accepted forms):
  sft          {prompt: str, response: str}  or  {messages: [{role, content}, ...]} ending with an
               assistant turn (the prompt is every turn before it)
  preferences  {prompt: str, chosen: str, rejected: str}  or  {chosen: [messages], rejected: [messages]}
               whose turns agree up to the final assistant turn (the shared prefix is the prompt)
  prompts      {prompt: str}  or  {messages: [...]} (all turns are the prompt)
Extra columns are ignored. A row that fits no form is malformed: `DataError` naming the file and the
row (1-based line for JSONL, 0-based index otherwise), or, with `on_bad_row="skip"`, it is dropped and
counted in `ReadStats.skipped` (with the first few reasons kept), never silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from rlhf_ray.errors import RunError

Kind = Literal["sft", "preferences", "prompts"]


class DataError(RunError, ValueError):
    """A data problem that names where it is (file and row); the CLI prints it without a traceback."""


@dataclass
class ReadStats:
    rows: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)  # the first 10, for the log

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.reasons) < 10:
            self.reasons.append(f"{where}: {why}")


# -- file formats ---------------------------------------------------------------------------------
def _jsonl(path: Path) -> list[tuple[str, object]]:
    out = []
    # Read as bytes and decode line by line: a file in another encoding (Latin-1, UTF-16) is then named
    # at the first line that is not UTF-8, like a line that is not JSON, instead of failing mid-iteration.
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            where = f"{path}:{i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                out.append((where, DataError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                             f"save the file as UTF-8")))
                continue
            if not line.strip():
                continue
            try:
                out.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                out.append((where, DataError(f"not valid JSON ({e.msg})")))
    return out


def _table(path: Path, table) -> list[tuple[str, object]]:
    return [(f"{path} row {i}", r) for i, r in enumerate(table.to_pylist())]


def _parquet(path: Path):
    import pyarrow.parquet as pq
    return _table(path, pq.read_table(path))


def _arrow_folder(path: Path):
    """A `datasets.Dataset.save_to_disk` folder: Arrow IPC stream files listed in `state.json`."""
    import pyarrow as pa
    state = json.loads((path / "state.json").read_text())
    rows: list = []
    for item in state["_data_files"]:
        f = path / item["filename"]
        with pa.memory_map(str(f)) as src:
            table = pa.ipc.open_stream(src).read_all()
        rows += [(f"{f} row {i}", r) for i, r in enumerate(table.to_pylist())]
    return rows


def raw_rows(path: str | Path) -> list[tuple[str, object]]:
    """`(where, row)` pairs of a file or folder; `row` is a DataError for an unparseable JSONL line."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist")
    if p.is_dir():
        if (p / "state.json").is_file():
            return _arrow_folder(p)
        raise DataError(f"{p} is a folder but not a `datasets` save_to_disk folder (no state.json)")
    if p.suffix in (".jsonl", ".json"):
        return _jsonl(p)
    if p.suffix == ".parquet":
        return _parquet(p)
    raise DataError(f"{p}: unknown data format {p.suffix!r}; use .jsonl, .parquet or a `datasets` folder")


# -- schemas --------------------------------------------------------------------------------------
def _text(row: dict, key: str, *, allow_empty: bool = False) -> str:
    v = row.get(key)
    if not isinstance(v, str):
        raise DataError(f"column {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"column {key!r} is empty")
    return v


def _messages(v: object, key: str) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise DataError(f"column {key!r} must be a non-empty list of {{role, content}} messages")
    for j, m in enumerate(v):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{key}[{j}] must be a mapping with string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in v]


def _split_last_assistant(msgs: list[dict], key: str) -> tuple[list[dict], str]:
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        raise DataError(f"{key} must end with an assistant turn after at least one other turn")
    if not msgs[-1]["content"].strip():
        raise DataError(f"the final assistant turn of {key} is empty")
    return msgs[:-1], msgs[-1]["content"]


def normalize(row: object, kind: Kind) -> dict:
    """One row in canonical form: `prompt` is a str or a message list; `response` / `chosen` / `rejected`
    are strings (the final assistant turn). Raises DataError naming what is wrong."""
    if not isinstance(row, dict):
        raise DataError(f"a row must be a mapping, got {type(row).__name__}")
    if kind == "prompts":
        # the row's other columns go with the prompt: an environment reads them (an answer, tests)
        columns = {k: v for k, v in row.items() if k not in ("prompt", "messages") and not k.startswith("_")}
        if "messages" in row and row["messages"] is not None:
            return {"prompt": _messages(row["messages"], "messages"), "columns": columns}
        return {"prompt": _text(row, "prompt"), "columns": columns}
    if kind == "sft":
        if "messages" in row and row["messages"] is not None:
            prompt, response = _split_last_assistant(_messages(row["messages"], "messages"), "messages")
            return {"prompt": prompt, "response": response}
        return {"prompt": _text(row, "prompt"), "response": _text(row, "response")}
    if kind == "preferences":
        if isinstance(row.get("chosen"), list):
            pc, chosen = _split_last_assistant(_messages(row["chosen"], "chosen"), "chosen")
            pr, rejected = _split_last_assistant(_messages(row.get("rejected"), "rejected"), "rejected")
            if pc != pr:
                raise DataError("'chosen' and 'rejected' conversations differ before the final assistant turn")
            return {"prompt": pc, "chosen": chosen, "rejected": rejected}
        return {"prompt": _text(row, "prompt"), "chosen": _text(row, "chosen"), "rejected": _text(row, "rejected")}
    raise ValueError(f"unknown row kind {kind!r}")


def read_rows(path: str | Path, kind: Kind, on_bad_row: str = "error",
              stats: Optional[ReadStats] = None) -> tuple[list[dict], ReadStats]:
    stats = stats or ReadStats()
    out = []
    for where, row in raw_rows(path):
        try:
            if isinstance(row, DataError):
                raise row
            out.append({**normalize(row, kind), "_where": where})
        except DataError as e:
            if on_bad_row != "skip":
                raise DataError(f"{where}: malformed {kind} row: {e} (set data.on_bad_row=skip to skip "
                                f"and count such rows)") from None
            stats.skip(where, str(e))
    stats.rows += len(out)
    if not out:
        raise DataError(f"{path}: no usable {kind} rows ({stats.skipped} skipped)")
    return out, stats
