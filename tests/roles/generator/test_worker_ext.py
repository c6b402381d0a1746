"""Which engines' TP workers take a sync off a broadcast (no vLLM start): the pure decision, and the
extension's fit into vLLM's worker class (vLLM refuses an extension attribute the worker already has)."""
import torch

from rlhf_ray.config.schema import RolloutConfig
from rlhf_ray.roles.generator.engine import engine_llm_kwargs, workers_receive
from rlhf_ray.roles.generator.worker_ext import EXTENSION, WeightReceiver, counted
from rlhf_ray.utils.device import resolve_backend


def _kwargs(tp, engine_kwargs=None):
    return engine_llm_kwargs("/m", RolloutConfig(tensor_parallel_size=tp), resolve_backend("cpu"), False, 128,
                             engine_kwargs=engine_kwargs)


def test_every_engine_gets_the_extension_and_tp_ones_receive_by_broadcast():
    assert _kwargs(2)["worker_extension_cls"] == EXTENSION and workers_receive(_kwargs(2))
    assert _kwargs(1)["worker_extension_cls"] == EXTENSION and not workers_receive(_kwargs(1))


def test_another_extension_falls_back_to_the_folder():
    assert not workers_receive(_kwargs(2, {"worker_extension_cls": "pkg.Other"}))
    assert workers_receive(_kwargs(1, {"tensor_parallel_size": 4}))   # the plan's construction arguments win


def test_counted_adds_each_tensors_bytes():
    tally = [0]
    named = [("a", torch.zeros(3, 5)), ("b", torch.zeros(7, dtype=torch.bfloat16))]
    assert [n for n, _ in counted(named, tally)] == ["a", "b"] and tally == [3 * 5 * 4 + 7 * 2]


def test_extension_names_do_not_clash_with_vllms_worker():
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.worker.cpu_worker import CPUWorker
    assert resolve_obj_by_qualname(EXTENSION) is WeightReceiver
    # vLLM adds the extension to the worker class's bases when it builds an in-process engine, so in a process
    # that built one earlier CPUWorker has these names through WeightReceiver itself: look at its other classes
    own = [vars(k) for k in CPUWorker.__mro__ if k is not WeightReceiver]
    clashes = [a for a in dir(WeightReceiver) if not a.startswith("__") and any(a in d for d in own)]
    assert clashes == []
