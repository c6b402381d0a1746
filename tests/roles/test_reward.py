import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from rlhf_ray.config import RewardConfig, RewardSource
from rlhf_ray.roles.reward import RewardScorer, RewardSourceError


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def test_weighted_sum_of_function_sources():
    cfg = RewardConfig(sources=(RewardSource(kind="function", path=f"{__name__}:length_reward", weight=0.5),
                                RewardSource(kind="function", path="rlhf_ray.data.builtin_reviews:vader_reward")))
    scores, stats = RewardScorer(cfg).score(["p", "p"], [" the movie was great .", " awful"])
    assert scores[0] == pytest.approx(0.5 * 22 + 0.6249, abs=1e-3)
    assert scores[1] < 0 + 0.5 * 6
    assert "reward/source0_mean" in stats


def test_unimportable_function_is_named():
    cfg = RewardConfig(sources=(RewardSource(kind="function", path="no_such_mod:f"),))
    with pytest.raises(RewardSourceError, match="no_such_mod:f"):
        RewardScorer(cfg)


class _Handler(BaseHTTPRequestHandler):
    calls = 0
    fail_first = 0

    def do_POST(self):
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).calls <= type(self).fail_first:
            self.send_response(503)
            self.end_headers()
            return
        out = json.dumps({"scores": [len(r) / 10 for r in body["responses"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    _Handler.calls, _Handler.fail_first = 0, 0
    srv = HTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_http_source_retries_then_succeeds(server):
    _Handler.fail_first = 1
    url = f"http://127.0.0.1:{server.server_port}/score"
    cfg = RewardConfig(sources=(RewardSource(kind="http", url=url, retries=2, timeout_s=5),))
    scores, _ = RewardScorer(cfg).score(["a"], ["abcde"])
    assert scores == [0.5] and _Handler.calls == 2


def test_http_source_gives_up_with_a_clear_error(server):
    _Handler.fail_first = 10
    url = f"http://127.0.0.1:{server.server_port}/score"
    cfg = RewardConfig(sources=(RewardSource(kind="http", url=url, retries=1, timeout_s=5),))
    with pytest.raises(RewardSourceError, match=r"failed after 2 attempts.*503"):
        RewardScorer(cfg).score(["a"], ["b"])


def test_model_source_scores_with_its_own_tokenizer():
    from rlhf_ray.models.kit import resolve_model_path
    cfg = RewardConfig(sources=(RewardSource(kind="model", path="builtin:tiny-rm"),))
    scorer = RewardScorer(cfg, resolve_path=resolve_model_path)
    scores, _ = scorer.score(["review of x :"] * 3, [" good", " a much longer response here", " good"])
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores)
    assert scores[0] == pytest.approx(scores[2], abs=1e-5)  # padding does not change a score


def test_length_mismatch():
    cfg = RewardConfig(sources=(RewardSource(kind="function", path=f"{__name__}:length_reward"),))
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        RewardScorer(cfg).score(["a", "b"], ["c"])


def test_model_source_reads_an_unfinished_response_without_eos():
    """A response cut at the generation limit is scored as written (no EOS), a finished one with its EOS, as in
    reward-model training; a function source sees the same text either way."""
    import torch

    from rlhf_ray.models.kit import resolve_model_path
    cfg = RewardConfig(sources=(RewardSource(kind="model", path="builtin:tiny-rm"),))
    scorer = RewardScorer(cfg, resolve_path=resolve_model_path)
    source = scorer.sources[0][0]
    prompt, response = "review of x :", " a much longer response here"
    scores, _ = scorer.score([prompt] * 3, [response] * 3, finished=[True, False, True])
    p = source.tok(prompt)["input_ids"]
    body = source.tok(response, add_special_tokens=False)["input_ids"]
    for ids, want in ((p + body + [source.tok.eos_token_id], scores[0]), (p + body, scores[1])):
        t = torch.tensor([ids])
        assert source._scores(t, torch.ones_like(t)).item() == pytest.approx(want, abs=1e-5)
    assert scores[0] == pytest.approx(scores[2], abs=1e-6) and scores[0] != pytest.approx(scores[1], abs=1e-3)
    with pytest.raises(ValueError, match="1 finish flags"):
        scorer.score([prompt] * 2, [response] * 2, finished=[True])
    fn = RewardScorer(RewardConfig(sources=(RewardSource(kind="function", path=f"{__name__}:length_reward"),)))
    assert fn.score(["a"], ["abc"], finished=[False])[0] == [3.0]
