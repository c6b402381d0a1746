"""rl.critic_init_from: a reward-model folder loaded as PPO's critic starts from the RM's weights."""
import pytest
import torch

from rlhf_ray.config import ModelConfig, load_config
from rlhf_ray.learner.build import build_model
from rlhf_ray.learner.checkpoint import MARKER
from rlhf_ray.models.kit import resolve_model_path
from rlhf_ray.pipeline import StageOutputs
from rlhf_ray.placement.shared import Paths, critic_init_path
from rlhf_ray.utils.device import resolve_backend


def test_critic_built_from_the_reward_model_has_its_weights_and_scores():
    from transformers import AutoModelForSequenceClassification
    rm_path = resolve_model_path("builtin:tiny-rm")
    rm = AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1).eval()
    critic = build_model(ModelConfig(), "value", rm_path, resolve_backend("cpu", "float32"),
                         pad_token_id=rm.config.pad_token_id or 0).eval()
    rm_sd, critic_sd = rm.state_dict(), critic.state_dict()
    # backbone and the `score` head come from the RM; the token-classification head adds a bias, at 0
    assert set(critic_sd) - set(rm_sd) == {"score.bias"} and set(rm_sd) <= set(critic_sd)
    assert torch.all(critic_sd["score.bias"] == 0)
    for name, t in rm_sd.items():
        torch.testing.assert_close(critic_sd[name], t, rtol=0, atol=0, msg=name)
    ids = torch.tensor([[5, 9, 13, 7, 21]])
    with torch.no_grad():
        value_last = critic(input_ids=ids).logits[0, -1, 0]
        score = rm(input_ids=ids).logits[0, 0]
    assert value_last.item() == pytest.approx(score.item(), abs=1e-6)  # V(final state) == the RM's reward


def test_critic_init_option_picks_the_critics_start_and_is_validated(tmp_path):
    outs = StageOutputs(tmp_path)
    (outs.final("rm")).mkdir(parents=True)
    (outs.final("rm") / MARKER).write_text("")
    paths = Paths(policy_init="/runs/sft/model", resolve=outs.resolve, scratch=str(tmp_path))
    cfg = load_config(None, ["algorithm.name=ppo", "rl.critic_init_from=stage:rm"])
    assert critic_init_path(cfg.rl, paths) == str(outs.final("rm"))  # the RM stage's output, resolved
    assert critic_init_path(load_config(None, ["algorithm.name=ppo"]).rl, paths) == "/runs/sft/model"
    with pytest.raises(Exception, match="rl.critic_init_from is set but algorithm.name=grpo trains no critic"):
        load_config(None, ["algorithm.name=grpo", "rl.critic_init_from=stage:rm"])
