"""`rlhf-ray plan` offline with an empty hub cache: the architecture facts of every hub model a shipped GPU
config names ship inside the package; a model in the hub cache is read from there instead."""
import json
from pathlib import Path

import pytest

from rlhf_ray.cli import main
from rlhf_ray.config import load_config
from rlhf_ray.models.hub import is_hub_id
from rlhf_ray.placement.budget import model_specs
from rlhf_ray.placement.plan import run_roles
from rlhf_ray.placement.report import model_config
from rlhf_ray.placement.shapes import KNOWN_MODELS, ModelShape, known_config
from tests.placement.hubcache import PUBLISHED, make_hub_cache

ROOT = Path(__file__).resolve().parents[2]
GPU_CONFIGS = sorted((ROOT / "configs" / "gpu").rglob("*.yaml"))


def _use_cache(monkeypatch, root: Path) -> None:
    import huggingface_hub.constants as c
    root.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)


def hub_ids(cfg) -> set[str]:
    return {s for specs in model_specs(cfg, run_roles(cfg)).values() for s in specs if is_hub_id(s)}


def test_every_hub_model_of_a_shipped_config_is_known():
    named = set().union(*(hub_ids(load_config(p)) for p in GPU_CONFIGS))
    assert named, "the shipped GPU configs name no hub model (the test would check nothing)"
    missing = sorted(m for m in named if known_config(m) is None)
    assert not missing, f"add their config.json to {KNOWN_MODELS}: {missing}"


SHIPPED = sorted(f.stem.replace("--", "/") for f in KNOWN_MODELS.glob("*.json"))


def test_facts_are_shipped():
    assert SHIPPED, f"no fact files under {KNOWN_MODELS} (the test below would check nothing)"


@pytest.mark.parametrize("repo", SHIPPED)
def test_shipped_facts_match_the_published_shapes(repo):
    """Every shipped fact file is checked against the model's published config.json (tests/placement/hubcache.py)."""
    assert repo in PUBLISHED, f"add {repo}'s published config.json fields to tests/placement/hubcache.py"
    assert known_config(repo) is not None
    assert ModelShape.from_config(known_config(repo)) == ModelShape.from_config(PUBLISHED[repo])


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_plan_passes_offline_with_an_empty_hub_cache(path, tmp_path, monkeypatch, capsys):
    _use_cache(monkeypatch, tmp_path / "empty-hub")
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "headroom" in out and "DOES NOT FIT" not in out
    assert not any((tmp_path / "empty-hub").iterdir())  # nothing was downloaded or cached


def test_the_hub_cache_wins_over_the_shipped_facts(tmp_path, monkeypatch):
    repo = "meta-llama/Llama-3.1-8B-Instruct"
    other = dict(known_config(repo), num_hidden_layers=2)
    _use_cache(monkeypatch, make_hub_cache(tmp_path / "hub", {repo: other}))
    assert model_config(repo)["num_hidden_layers"] == 2
    _use_cache(monkeypatch, tmp_path / "empty")
    assert model_config(repo)["num_hidden_layers"] == 32


def test_an_unknown_uncached_hub_model_is_one_line(tmp_path, monkeypatch):
    from rlhf_ray.models.hub import HubModelMissing
    _use_cache(monkeypatch, tmp_path / "empty")
    with pytest.raises(HubModelMissing, match="hf download org/unknown-model"):
        model_config("org/unknown-model")


def test_every_shipped_fact_file_is_valid_json_with_a_shape():
    files = sorted(KNOWN_MODELS.glob("*.json"))
    assert files and (KNOWN_MODELS / "README.md").exists()
    for f in files:
        ModelShape.from_config(json.loads(f.read_text()), name=f.name)
