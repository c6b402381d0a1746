"""Weight sync from the learner to the generator engines: packing, transport, checks."""
from rlhf_ray.sync.buckets import Bucket, TensorSpec, pack_buckets, total_bytes, unpack_bucket
from rlhf_ray.sync.checks import (Agreement, LogprobMismatchError, StaleWeightsError, check_logprob_agreement,
                                  check_version, logprob_agreement)

__all__ = ["Agreement", "Bucket", "TensorSpec", "pack_buckets", "unpack_bucket", "total_bytes", "StaleWeightsError",
           "LogprobMismatchError", "check_version", "logprob_agreement", "check_logprob_agreement"]
