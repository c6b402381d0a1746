"""What `RUN_OR_MODEL` names: a run folder, a HF model folder, a peft adapter folder, or a builtin: name."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rlhf_ray.errors import RunError


@dataclass(frozen=True)
class Source:
    base: Path               # a full HF folder: the policy itself, or the base the adapter applies to
    adapter: Optional[Path]  # a peft adapter folder to merge on top, if any
    name: str                # a short name for the exported model
    merged: bool = False     # True when `base` already holds the adapter's weights (a run's final model)

    @property
    def to_merge(self) -> Optional[Path]:
        return None if self.merged else self.adapter


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def resolve_source(spec: str) -> Source:
    """A run folder exports its final policy (RL, else SFT); under LoRA its adapter is kept alongside."""
    from rlhf_ray.models.kit import BUILTIN, resolve_model_path
    if spec.startswith(BUILTIN):
        return Source(Path(resolve_model_path(spec)), None, spec[len(BUILTIN):])
    path = Path(spec).expanduser()
    if not path.exists():
        raise RunError(f"export: {spec} does not exist (give a run folder, a model folder, an adapter folder or a "
                       f"builtin: name)")
    for stage in ("rl", "sft"):
        if _complete(path / stage / "model"):
            adapter = path / stage / "adapter"
            # The run's model folder is already merged (see rl/run.py); its adapter serves `--format adapter`.
            return Source(path / stage / "model", adapter if (adapter / "adapter_config.json").is_file() else None,
                          path.resolve().name, merged=True)
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not _complete(Path(base)):
            raise RunError(f"export: the adapter {spec} names base model {base!r}, which is not a model folder here")
        return Source(Path(base), path, path.resolve().name)
    if _complete(path):
        return Source(path, None, path.resolve().name)
    raise RunError(f"export: {spec} is neither a run folder (with rl/model or sft/model), a model folder (config.json)"
                   f" nor an adapter folder (adapter_config.json)")
