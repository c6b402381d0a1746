"""The slow tier's order on parallel workers: the heaviest work first, so that neither worker is left with a
long test while the other has nothing (longest-processing-time-first scheduling).

pytest-xdist's loadgroup hands a worker the next unit (a group's tests, or one ungrouped test) whenever it has
two tests or fewer left, in the order the units first appear in the collection, given `--no-loadscope-reorder`
(the Makefile). Its default reorders units by how many tests they hold, which put every single-test unit (the
end-to-end CLI runs, 30-110 s each) after all the groups, and the tier ended on one worker running them while
the other sat idle (a minute and more at 30-60% idle on this 2-core machine).

Units are ordered here by their recorded seconds (slow_durations.json: setup + call + teardown per test, as
the controller saw them; a test not in it counts DEFAULT_S), heaviest first; one unit that needs the
session's shared SFT + reward model (e2e/conftest.py `offline`) goes before all: its worker trains them (about
a minute) while the other takes the heaviest units that need nothing. Refresh the record with
`RLHF_RAY_RECORD_DURATIONS=tests/slow_durations.json make test`: a wrong weight only costs time.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

RECORD = Path(__file__).with_name("slow_durations.json")
RECORD_ENV = "RLHF_RAY_RECORD_DURATIONS"
DEFAULT_S = 20.0  # a slow test not yet recorded: most start Ray or a role's process, 5-30 s here


def bare(nodeid: str) -> str:
    """The test's id without pytest-xdist's "@group" suffix."""
    return nodeid.split("@", 1)[0]


def _unit(item) -> str:
    group = item.get_closest_marker("xdist_group")
    return f"group {group.args[0] if group.args else group.kwargs.get('name')}" if group else bare(item.nodeid)


def heaviest_first(items: list, seconds: dict[str, float]) -> None:
    """Reorder `items` in place: units by their summed seconds, heaviest first, and the heaviest unit that
    needs the shared pipeline before them all; a unit's own tests keep their order."""
    slow = [i for i in items if i.get_closest_marker("slow")]
    if not slow:
        return
    weight: dict[str, float] = defaultdict(float)
    for item in slow:
        weight[_unit(item)] += seconds.get(bare(item.nodeid), DEFAULT_S)
    needs = {_unit(i) for i in slow if "offline" in getattr(i, "fixturenames", ())}
    first = max(needs, key=weight.__getitem__) if needs else None

    def key(item) -> tuple:  # the sort is stable: equal keys keep the collection's order
        if not item.get_closest_marker("slow"):  # a run of both tiers: the fast tests after
            return True, False, 0.0
        unit = _unit(item)
        return False, unit != first, -weight[unit]
    items.sort(key=key)


class SlowOrder:
    """A plugin of its own (tests/conftest.py registers it): a module holds one function of a hook's name."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = defaultdict(float)

    @pytest.hookimpl(trylast=True)  # after `-m` deselected: the unit picked to go first must be one that runs
    def pytest_collection_modifyitems(self, items):
        heaviest_first(items, json.loads(RECORD.read_text()) if RECORD.exists() else {})

    def pytest_runtest_logreport(self, report):
        if os.environ.get(RECORD_ENV) and "slow" in report.keywords:
            self.seen[bare(report.nodeid)] += report.duration

    def pytest_sessionfinish(self, session):
        path = os.environ.get(RECORD_ENV)
        if not path or not self.seen or hasattr(session.config, "workerinput"):  # the controller writes it
            return
        record = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        record.update({k: round(v, 1) for k, v in self.seen.items()})
        Path(path).write_text(json.dumps(dict(sorted(record.items())), indent=0) + "\n")
