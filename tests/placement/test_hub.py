"""Hub ids in model paths: found in a hub cache of huggingface_hub's own layout made here; offline and
not cached, one line that says how to pre-download."""
import pytest

from rlhf_ray.models.hub import HubModelMissing, is_hub_id
from rlhf_ray.models.kit import resolve_model_path
from tests.placement.hubcache import make_hub_cache


@pytest.fixture
def hub(tmp_path, monkeypatch):
    root = make_hub_cache(tmp_path / "hub", {"org/model": {"hidden_size": 8}})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return root


def test_a_cached_hub_id_resolves_to_its_snapshot(hub):
    folder = resolve_model_path("org/model")
    assert folder.startswith(str(hub / "models--org--model" / "snapshots"))
    assert (hub / "models--org--model" / "snapshots").exists()


def test_offline_and_not_cached_is_one_line_naming_the_download(hub):
    with pytest.raises(HubModelMissing) as e:
        resolve_model_path("org/absent")
    msg = str(e.value)
    assert "\n" not in msg and "`hf download org/absent`" in msg and "HF_HUB_OFFLINE=1" in msg


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    assert is_hub_id("meta-llama/Llama-3.1-8B-Instruct")
    assert not is_hub_id("/models/rm") and not is_hub_id("runs/x/model") and not is_hub_id("builtin:tiny")
    (tmp_path / "org" / "local").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("org/local")  # an existing local folder wins
