"""Collection on any install: the docstring examples of modules whose optional engine is
not installed are not collected (their tests skip themselves with ``importorskip``)."""

import importlib.util

collect_ignore_glob = []
if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob.append("tokur_decode/vllm/*.py")
