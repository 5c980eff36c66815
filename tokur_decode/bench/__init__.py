"""Benchmarks: each reports ratios against a baseline measured in the same run.

:mod:`~tokur_decode.bench.hf` (monitor overhead, TokUR, actions' cost on the embedded
model), :mod:`~tokur_decode.bench.vllm` (the processor inside the engine) and
:mod:`~tokur_decode.bench.vllm_tokur` (TokUR in the engine); ``tokur-decode bench ...``.
"""
