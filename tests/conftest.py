"""Shared test settings: nothing may reach a model hub; thread counts fit the 2-core machine."""
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The product's own Ray starts say this (rlhf_ray/runtime.py); the tests' module clusters say it too: no idle
# workers prestarted that no actor uses (the baseline slow tier left 89 of them, 62 CPU-seconds)
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
# model.dtype=measure resolves to fp32 in the suite (its log-prob tolerances are fp32's), and no probe result
# lands in the user's cache; e2e CLI subprocesses inherit it
os.environ.setdefault("RLHF_RAY_CPU_DTYPE", "float32")
# What a CPU run's role processes run with (rlhf_ray/runtime.py LOCAL_CPU_ENV): engines the tests build in their
# own process would otherwise compile vLLM's sampler kernel on their first generation, as no product run does
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


@pytest.fixture(scope="module")
def ray_local():
    """A 2-CPU local Ray per test module, always shut down (modules that need Ray each start their own)."""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2 ** 20, configure_logging=False)
    yield ray
    ray.shutdown()


# -- the fast tier stays fast: a test that starts Ray, a vLLM engine or a DeepSpeed learner must say so ------
# (`@pytest.mark.slow`; `make test-fast` / CI's first tier run `-m "not slow"`). Each entry: where the start
# happens, and what it starts. Product code reaches vLLM only through GeneratorEngine and DeepSpeed only
# through Learner; tests that call the libraries directly call these too.
STARTS = [("ray", "init", "Ray"), ("ray._private.worker", "init", "Ray"),
          ("ray.cluster_utils", "Cluster.__init__", "a Ray cluster"),
          ("rlhf_ray.roles.generator.engine", "GeneratorEngine.__init__", "a vLLM engine"),
          ("rlhf_ray.learner.learner", "Learner.__init__", "a DeepSpeed learner")]


class StartedInTheFastTier(BaseException):
    """A BaseException, so that the product's own `except Exception` (one-line errors) cannot swallow it."""


@pytest.fixture(autouse=True)
def _fast_tier_starts_nothing(request, monkeypatch):
    if request.node.get_closest_marker("slow"):
        yield
        return
    import importlib
    started = []

    def refuse(what):
        def start(*args, **kwargs):
            started.append(what)
            raise StartedInTheFastTier(f"{request.node.nodeid} starts {what}: mark it @pytest.mark.slow")
        return start

    for module, attr, what in STARTS:
        owner = importlib.import_module(module)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        monkeypatch.setattr(owner, name, refuse(what))
    yield
    if started:
        pytest.fail(f"{request.node.nodeid} starts {started[0]} but is not marked slow "
                    "(@pytest.mark.slow: the fast tier must run in seconds)", pytrace=False)


# -- the slow tier on parallel workers (pytest-xdist, `--dist loadgroup`; see the Makefile) ----------------
# A slow module's tests share module-scoped processes (engines, servers, a local Ray), so by default they stay
# on one worker together. The end-to-end modules below are each a row of independent CLI runs: their tests
# spread over the workers, except those that read one shared run. Local multi-node clusters (ray.cluster_utils)
# start one at a time.
SPREAD = {"test_train_cli.py", "test_algorithms_cli.py", "test_offline_train.py", "test_faults.py",
          "test_bad_inputs_cli.py", "test_signals_cli.py", "test_ppo_adapters_resume.py", "test_simulate_train.py"}
SHARED_RUN = {"ppo_run": "e2e-ppo-run"}
CLUSTERS = {"test_two_ranks_per_stage_on_a_two_node_cluster", "test_a_shipped_gpu_config_runs_two_rl_steps_on_its_simulated_cluster"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if not item.get_closest_marker("slow") or item.get_closest_marker("xdist_group"):
            continue
        name = item.originalname if hasattr(item, "originalname") else item.name
        shared = [SHARED_RUN[f] for f in getattr(item, "fixturenames", ()) if f in SHARED_RUN]
        if name in CLUSTERS:
            group = "local-clusters"
        elif shared:
            group = shared[0]
        elif item.path.name in SPREAD:
            continue
        else:
            group = item.path.name
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_configure(config):
    import run_scratch
    from slow_order import SlowOrder  # the slow tier's order on the workers, heaviest first (tests/ is on the path)
    config.pluginmanager.register(SlowOrder(), "rlhf_ray_slow_order")
    run_scratch.register(config)  # the run's temp files in one folder of its own, removed when it passes


REFUSED = pytest.StashKey[str]()  # a reason every test of this run fails (set while collecting)
# What a fast-tier run must not import while it collects every module (it deselects the slow tests after): vLLM's
# import is 12 CPU-seconds on a 2-core AMD EPYC, a quarter of the tier's time on each worker.
FAST_TIER_NEVER_IMPORTS = ("vllm",)


@pytest.hookimpl(trylast=True)  # after pytest-xdist's worker has named each item's group
def pytest_collection_finish(session):
    """Refuse a worker whose groups did not take: pytest-xdist's loadgroup keeps a group on one worker by
    appending "@group" to each item's id, and a pytest that ignores the append (pytest 9 with xdist 3.8) leaves
    every test ungrouped without a word: each module fixture (an engine group, a server, a shared run) then
    starts once per worker, and local clusters start side by side."""
    heavy = [m for m in FAST_TIER_NEVER_IMPORTS if m in sys.modules]
    if heavy and session.items and not any(i.get_closest_marker("slow") for i in session.items):
        session.config.stash[REFUSED] = (f"collecting the fast tier imported {heavy[0]} (vLLM: 12 CPU-seconds a worker "
                                           f"on a 2-core AMD EPYC): a test module imports it at its top; import it inside "
                                           f"the tests that need it")
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:  # said by every test (an error raised here would reach the controller as a bare INTERNALERROR)
        session.config.stash[REFUSED] = (f"pytest-xdist's loadgroup did not group {lost[0]} (and {len(lost) - 1} "
                                           f"more) under pytest {pytest.__version__}: install the pinned test tools "
                                           f"(make setup)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("long") and not item.get_closest_marker("slow"):
        pytest.fail(f"{item.nodeid} is marked long but not slow: the long tier is part of the slow one "
                    "(@pytest.mark.slow too)", pytrace=False)
    if REFUSED in item.config.stash:
        pytest.fail(item.config.stash[REFUSED], pytrace=False)
