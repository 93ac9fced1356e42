"""A function shipped by value is pickled once and reused: the worker must still see every change.

rtq keeps the pickle of a function shipped by value (a notebook's, this module's) and reuses it
while nothing that went into it changed (:mod:`rtq.funcpickles`). These tests change each thing
a function's pickle is made of between two calls, and check that the second call, run by a
real worker process that cannot import this module, sees the change.
"""

from __future__ import annotations

import gc
import pickle
import weakref

import cloudpickle
import pytest

import rtq
from conftest import ROOT
from rtq import funcpickles, sources
from rtq.closures import ship_local_modules

pytestmark = pytest.mark.timeout(120)

# Workers get only src/ on their path: everything below travels by value.
ISOLATED = {"PYTHONPATH": str(ROOT / "src")}

FACTOR = 2
OFFSET = 100
SETTINGS = {"lr": 0.1}
COUNT = 0


def scaled(x):
    return x * FACTOR


def offset(x):
    return x + OFFSET


def through_helper(x):
    return offset(x) * 10


def learning_rate():
    return SETTINGS["lr"]


def counted():
    global COUNT
    COUNT += 1
    return COUNT


def tagged():
    tagged.calls = getattr(tagged, "calls", 0) + 1
    return tagged.calls


def through_globals():
    space = globals()
    space["calls"] = space.get("calls", 0) + 1
    return space["calls"]


def bumper():
    n = 0

    def bump():
        nonlocal n
        n += 1
        return n

    return bump


def with_default(x, k=3):
    return x * k


@pytest.fixture
def ex(queue, workers):
    workers.start("fp", task_fn=None, env=ISOLATED, args=("--workers", "1"))
    executor = rtq.Executor(queue, "fp", timeout=30)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


@pytest.fixture(autouse=True)
def fresh_globals():
    global FACTOR, OFFSET, COUNT
    yield
    FACTOR, OFFSET, COUNT = 2, 100, 0
    SETTINGS["lr"] = 0.1
    with_default.__defaults__ = (3,)


def reduced(fn):
    ship_local_modules()  # this module goes by value, as an Executor would ship it
    return funcpickles.pickled(fn, sources._CodePickler, funcpickles.world())


def blob(fn):
    kept = reduced(fn)
    return None if kept is None else kept[1]


def test_a_function_reading_only_constants_is_pickled_once():
    first = blob(scaled)
    assert first is not None
    assert blob(scaled) is first  # the same bytes, not pickled again
    assert blob(through_helper) is blob(through_helper)


def test_a_changed_global_reaches_the_worker(ex):
    global FACTOR
    assert ex.submit(scaled, 7).result(30) == 14
    FACTOR = 5
    assert ex.submit(scaled, 7).result(30) == 35


def test_a_changed_global_of_a_helper_reaches_the_worker(ex):
    global OFFSET
    assert ex.submit(through_helper, 1).result(30) == 1010
    OFFSET = 200
    assert ex.submit(through_helper, 1).result(30) == 2010


def test_a_redefined_helper_reaches_the_worker(ex, monkeypatch):
    assert ex.submit(through_helper, 1).result(30) == 1010
    monkeypatch.setitem(globals(), "offset", lambda x: -x)
    assert ex.submit(through_helper, 1).result(30) == -10


def test_a_dict_changed_in_place_reaches_the_worker(ex):
    assert ex.submit(learning_rate).result(30) == 0.1
    SETTINGS["lr"] = 0.5
    assert ex.submit(learning_rate).result(30) == 0.5
    assert blob(learning_rate) is None  # it reads a dict: pickled afresh every time


def test_changed_defaults_and_closure_values_reach_the_worker(ex):
    assert ex.submit(with_default, 2).result(30) == 6
    with_default.__defaults__ = (10,)
    assert ex.submit(with_default, 2).result(30) == 20

    step = 1

    def add(x):
        return x + step

    assert ex.submit(add, 1).result(30) == 2
    step = 41
    assert ex.submit(add, 1).result(30) == 42


def test_a_function_that_cannot_change_itself_is_unpickled_once_per_worker():
    assert reduced(scaled)[0] is funcpickles.load_shared
    assert reduced(through_helper)[0] is funcpickles.load_shared
    shipped = blob(scaled)
    assert funcpickles.load_shared(shipped) is funcpickles.load_shared(shipped)
    assert funcpickles.load(shipped) is not funcpickles.load(shipped)


@pytest.mark.parametrize(
    "make",
    [lambda: counted, lambda: tagged, lambda: through_globals, bumper],
    ids=["global", "attribute", "globals()", "nonlocal"],
)
def test_a_task_changing_its_function_changes_nothing_for_the_next_call(ex, make):
    # Each call unpickles its own copy of a function that can change itself (its globals, its
    # attributes, its closure), as before: the worker does not share one between calls.
    fn = make()
    assert reduced(fn)[0] is funcpickles.load
    assert [ex.submit(fn).result(30) for _ in range(3)] == [1, 1, 1]


def test_a_module_no_longer_shipped_by_value_changes_what_travels(tmp_path, monkeypatch):
    (tmp_path / "fp_helpers_q.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fp_helpers_q

    triple = fp_helpers_q.triple

    def direct(x):
        return triple(x)

    def helper_in(pickled):
        return pickle.loads(pickled).__closure__[0].cell_contents

    before = blob(direct)  # a local module: its code travels with the call (a copy of triple)
    assert before is not None and helper_in(before) is not triple and helper_in(before)(2) == 6
    cloudpickle.unregister_pickle_by_value(fp_helpers_q)  # by reference now: the worker imports it
    try:
        after = blob(direct)
        assert after is not None and helper_in(after) is triple
    finally:
        cloudpickle.register_pickle_by_value(fp_helpers_q)

    def uses(x):
        return fp_helpers_q.triple(x)

    assert blob(uses) is None  # a module shipped by value is a namespace that can change: pickled afresh


def test_no_data_a_function_read_is_kept_alive():
    class Table:
        pass

    table = Table()

    def reads(x):
        return table, x

    seen = weakref.ref(table)
    assert blob(reads) is None
    table = None
    gc.collect()
    assert seen() is None


def test_functions_made_in_a_loop_do_not_pile_up():
    made = [lambda x, i=i: x + i for i in range(funcpickles.MAX_KEPT + 50)]
    for fn in made:
        assert blob(fn) is not None
    assert len(funcpickles._entries) <= funcpickles.MAX_KEPT
    last = weakref.ref(made[-1])
    del made, fn
    gc.collect()
    assert last() is None  # an entry does not keep its function alive


def test_a_function_moved_out_of_its_module_is_no_longer_sent_by_name(monkeypatch):
    import textwrap

    original = textwrap.dedent
    assert pickle.loads(sources.dumps(original)) is original  # by name: the worker imports it
    assert pickle.loads(sources.dumps(original)) is original  # (the answer kept)
    monkeypatch.setattr(textwrap, "dedent", lambda text: text)
    copy = pickle.loads(sources.dumps(original))  # its name finds another function now: by value
    assert copy is not original and copy("  a\n  b") == "a\nb"
