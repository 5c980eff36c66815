"""The core: what every backend shares and nothing backend-specific.

Signals and their registry (:mod:`~tokur_decode.core.signals`) from one read of a step's
logits (:mod:`~tokur_decode.core.logit_stats`), response-level reducers
(:mod:`~tokur_decode.core.aggregate`), traces (:mod:`~tokur_decode.core.trace`), triggers
(:mod:`~tokur_decode.core.policy`), selection and voting (:mod:`~tokur_decode.core.select`),
the actions' logit edits (:mod:`~tokur_decode.core.logit_edits`), TokUR's perturbation
maths (:mod:`~tokur_decode.core.perturbation`), prompts and texts
(:mod:`~tokur_decode.core.text`), the result type (:mod:`~tokur_decode.core.result`) and
served traces' encodings (:mod:`~tokur_decode.core.packing`).
The core imports torch (and safetensors for TokUR's bases), never a backend, vLLM or
Outlines.
"""
