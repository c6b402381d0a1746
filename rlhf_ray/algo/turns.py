"""Multi-turn episodes: the policy's tokens with the environment's in between (`rlhf_ray.envs`).

An episode's response row is [turn 1][env reply 1][turn 2]...; its mask is 1 on policy tokens only, so it has
holes. The environment's tokens are not actions: nothing is estimated, trained or checked on them. The
sequence-level estimators (GRPO, Dr.GRPO, RLOO) already only sum and broadcast over the mask: one advantage
per episode on every policy token. The token-level scans (GAE, REINFORCE++) read the first masked position as
the end of the episode, so they run on the policy tokens packed to the left (`pack_policy_tokens`) and the
result goes back to the tokens' places (`unpack_policy_tokens`): in GAE the last token of a turn bootstraps
from V at the next turn's first token (the environment's reply is part of the transition, reward 0), one
advantage per token across the whole episode, as in single-turn PPO.

Shapes: (B, T) right-padded rows with holes; packed (B, T) rows without holes.
"""
from __future__ import annotations

import torch


def has_holes(mask: torch.Tensor) -> bool:
    """Whether some row has a real token after a masked one (an environment's reply inside an episode)."""
    m = mask.float()
    return bool((m[:, 1:] > m[:, :-1]).any())


def _order(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) a stable permutation of each row that puts its masked-in positions first, in order."""
    keys = (mask <= 0).to(torch.int64) * mask.shape[1] + torch.arange(mask.shape[1], device=mask.device)
    return keys.argsort(dim=1)


def pack_policy_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): each row's masked-in values moved left in order, zeros after them."""
    packed = x.gather(1, _order(mask))
    count = (mask > 0).sum(1, keepdim=True)
    keep = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) < count
    return torch.where(keep, packed, torch.zeros_like(packed))


def unpack_policy_tokens(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_policy_tokens` on masked-in positions; 0 on the others."""
    out = torch.zeros_like(y).scatter(1, _order(mask), y)
    return out * (mask > 0).to(y.dtype)
