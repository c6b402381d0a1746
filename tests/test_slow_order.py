"""The slow tier's order (slow_order.py): the unit that trains the shared pipeline first, then units by their
recorded seconds, heaviest first, each group's tests together and in their own order."""
from types import SimpleNamespace

import pytest
from slow_order import DEFAULT_S, heaviest_first


def _item(nodeid, group=None, slow=True, offline=False):
    marks = {"slow": slow and SimpleNamespace(args=()), "xdist_group": group and SimpleNamespace(args=(group,))}
    return SimpleNamespace(nodeid=nodeid, fixturenames=("offline",) if offline else (),
                           get_closest_marker=lambda name: marks.get(name) or None)


def test_the_pipeline_first_then_the_heaviest_units_with_their_groups_together():
    items = [_item("fast.py::a", slow=False), _item("g.py::one@g", "g"), _item("light.py::t"),
             _item("heavy.py::t"), _item("g.py::two@g", "g"), _item("dpo.py::t", offline=True),
             _item("sft.py::t", offline=True), _item("unknown.py::t")]
    seconds = {"g.py::one": 30, "g.py::two": 40, "light.py::t": 5, "heavy.py::t": 100, "dpo.py::t": 90,
               "sft.py::t": 10}
    heaviest_first(items, seconds)
    assert [i.nodeid for i in items] == [
        "dpo.py::t",                      # needs the pipeline, the heaviest such unit: its worker trains it
        "heavy.py::t",                    # 100 s
        "g.py::one@g", "g.py::two@g",     # the group's 70 s, its tests in their order
        "unknown.py::t",                  # not recorded: DEFAULT_S
        "sft.py::t", "light.py::t",       # 10 s, 5 s
        "fast.py::a"]                     # the fast tier's tests after the slow ones
    assert 10 < DEFAULT_S < 70


@pytest.mark.parametrize("nodeids", [["fast.py::a", "fast.py::b"], []])
def test_a_run_without_slow_tests_keeps_its_order(nodeids):
    items = [_item(n, slow=False) for n in nodeids]
    heaviest_first(items, {})
    assert [i.nodeid for i in items] == nodeids
