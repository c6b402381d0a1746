"""Weight sync from the learner to the generator engines: transports, versions, checks (the buckets the
weights travel in: `rlhf_ray.buckets`)."""
from rlhf_ray.sync.checks import (Agreement, LogprobMismatchError, StaleWeightsError, check_logprob_agreement,
                                  check_version, logprob_agreement)

__all__ = ["Agreement", "StaleWeightsError", "LogprobMismatchError", "check_version", "logprob_agreement",
           "check_logprob_agreement"]
