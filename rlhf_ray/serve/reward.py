"""The reward model as an HTTP service (`reward.sources: [{kind: http}]` calls it during training).

Concurrent requests are scored together: `serve.batch` gathers them (up to serve.reward_max_batch_size,
waiting at most serve.reward_batch_wait_s) into one forward pass, which is where a GPU pays off.
"""
from __future__ import annotations


class BatchedScorer:
    """Turns a `score_fn(prompts, responses) -> (scores, stats)` into an awaitable that batches callers."""

    def __init__(self, score_fn, max_batch_size: int, wait_s: float):
        from ray import serve
        self._score_fn = score_fn
        self.batch_sizes: list[int] = []  # requests per call, for tests and logs
        self._batched = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=wait_s)(self._score_many)

    async def _score_many(self, requests: list[tuple[list[str], list[str]]]) -> list[list[float]]:
        self.batch_sizes.append(len(requests))
        prompts = [p for ps, _ in requests for p in ps]
        responses = [r for _, rs in requests for r in rs]
        scores, _ = self._score_fn(prompts, responses)
        out, start = [], 0
        for ps, _ in requests:
            out.append([float(s) for s in scores[start:start + len(ps)]])
            start += len(ps)
        return out

    async def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return await self._batched((prompts, responses))


def reward_application(reward_cfg, serve_cfg, resolve_path, device: str = "cpu", cpus: float = 1.0):
    from ray import serve

    def build():
        from rlhf_ray.roles.reward import RewardScorer
        from rlhf_ray.serve.api import reward_app
        scorer = RewardScorer(reward_cfg, resolve_path=resolve_path, device=device)
        return reward_app(BatchedScorer(scorer.score, serve_cfg.reward_max_batch_size, serve_cfg.reward_batch_wait_s))

    # Serve's default of 5 requests in flight per replica would cap every batch at 5.
    deployment = serve.deployment(serve.ingress(build)(), name="reward",
                                  max_ongoing_requests=2 * serve_cfg.reward_max_batch_size,
                                  ray_actor_options={"num_cpus": cpus, "num_gpus": serve_cfg.reward_gpus})
    return deployment.bind()
