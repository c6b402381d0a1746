"""What Ray runs first in every worker process of our job (`runtime.setup_role_process`): the tensor wire
(`rlhf_ray.utils.wire`) is in place once the process imports torch, and a process that never needs torch
(Ray Train's controller and helpers, queues) is not made to import it."""
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_with_our_hook():
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=256 * 2 ** 20,
             runtime_env={"worker_process_setup_hook": "rlhf_ray.runtime.setup_role_process"})
    yield ray
    ray.shutdown()


def test_a_worker_imports_torch_only_when_it_needs_it_and_then_sends_tensors_by_the_wire(ray_with_our_hook):
    ray = ray_with_our_hook

    class Probe:  # defined here, not at module level: pickled by value, its worker imports no test module
        def torch_imported(self) -> bool:
            return "torch" in sys.modules

        def pickled_tensor(self) -> bytes:
            import torch
            return ray.cloudpickle.dumps(torch.zeros(2))  # what Ray's pickler makes of a tensor this process sends

    probe = ray.remote(num_cpus=0)(Probe).remote()
    assert ray.get(probe.torch_imported.remote()) is False
    assert b"from_wire" in ray.get(probe.pickled_tensor.remote())  # raw bytes, not torch's own pickling
    assert ray.get(probe.torch_imported.remote()) is True
