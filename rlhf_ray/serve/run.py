"""`rlhf-ray serve`: start the policy (or reward) application on a Ray session and hold it until stopped."""
from __future__ import annotations

import signal
import time
from pathlib import Path

from rlhf_ray.config import Config


def serve_until_stopped(cfg: Config, what: str, seconds: float = 0) -> None:
    """Serve until Ctrl-C, SIGTERM, or `seconds` (0: no limit); Serve and a Ray this call started are stopped."""
    from ray import serve

    from rlhf_ray.pipeline import StageOutputs
    from rlhf_ray.runtime import ray_session
    from rlhf_ray.serve.adapters import check_adapters
    from rlhf_ray.serve.policy import policy_application, resolve_api_key
    from rlhf_ray.serve.reward import reward_application
    from rlhf_ray.utils.device import resolve_backend

    outs = StageOutputs(Path(cfg.run.output_dir))
    backend = resolve_backend(cfg.cluster.device, cfg.model.dtype)
    if what == "policy":
        model = outs.resolve(cfg.serve.model or "stage:rl")
        resolve_api_key(cfg.serve), check_adapters(cfg.serve.adapters)  # bad input fails before Ray starts
        build = lambda: policy_application(model, cfg.serve, backend.dtype_name)  # noqa: E731
        names = [cfg.serve.model_name] + [f"{cfg.serve.model_name}:{a}" for a in cfg.serve.adapters]
        about = f"policy {model} as {', '.join(names)} (OpenAI API under /v1)"
    else:
        device = "cuda" if cfg.serve.reward_gpus else backend.device
        build = lambda: reward_application(cfg.reward, cfg.serve, outs.resolve, device)  # noqa: E731
        about = "reward service (POST /score)"
    deadline = time.time() + seconds
    with ray_session(cfg.cluster):  # build inside: building touches Ray, which would start a default one
        app = build()
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        try:
            serve.run(app, name=what, route_prefix="/")
            print(f"serving {about} at http://{cfg.serve.host}:{cfg.serve.port}  (Ctrl-C to stop)", flush=True)
            stop: list[int] = []
            signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
            try:
                while not stop and (seconds <= 0 or time.time() < deadline):
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
        finally:
            serve.shutdown()
