"""The placement tests' hub cache: the published config.json of each shipped GPU config's models, in
huggingface_hub's own layout, offline."""
import pytest

from tests.placement.hubcache import make_hub_cache


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(make_hub_cache(tmp_path / "hub")))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"
