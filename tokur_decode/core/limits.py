"""The largest sizes a caller may ask for, and the check that a decoding step's logits
fit in the memory the device has.

Each bound is where the cost stops being worth it or where the machine, not the method,
would give out; each is checked where the size enters (the CLI's flags when parsed, the
Python API in the constructors), so a request that cannot run is refused before any
model loads. What the model limits (the context) is checked against the model, what the
machine limits (rows of logits at once) against the memory available when decoding
starts (:func:`check_logits_fit`).

=======================  =======  =============================================================
bound                    value    why
=======================  =======  =============================================================
``MAX_CANDIDATES``       1024     sampled answers per prompt (``--n``, best-of-N, particles)
``MAX_SAMPLES``          64       TokUR's predictive samples M on the command line (the
                                  papers use 5 to 10); in Python the memory check below
                                  bounds them (a statistical test may draw thousands on a
                                  tiny model)
``MAX_BATCH``            1024     prompts per batched call
``MAX_VOCAB``            1048576  vocabulary size of a synthetic benchmark (``bench signals``)
``MAX_REPEATS``          10000    random subsets per item and N in ``scale``
``MAX_BOOTSTRAP``        100000   bootstrap resamples of an interval
answer length            1000     :data:`tokur_decode.verbalized.MAX_ANSWER_CHARS`
context                  model    prompt + answer budget within the model's positions
=======================  =======  =============================================================

Example:
    >>> check_logits_fit(8, 49_152, available=2**30)
    >>> check_logits_fit(100_000, 49_152, what="n x batch_size", available=2**30)
    Traceback (most recent call last):
    ...
    ValueError: n x batch_size: 100000 rows of 49152 logits need about 73.2 GiB per step; \
1.0 GiB is available (ask for fewer)
"""

from __future__ import annotations

__all__ = [
    "MAX_BATCH",
    "MAX_VOCAB",
    "MAX_BOOTSTRAP",
    "MAX_CANDIDATES",
    "MAX_REPEATS",
    "MAX_SAMPLES",
    "available_memory",
    "check_context",
    "check_logits_fit",
]

MAX_CANDIDATES = 1024
MAX_SAMPLES = 64
MAX_BATCH = 1024
MAX_VOCAB = 1 << 20
MAX_REPEATS = 10_000
MAX_BOOTSTRAP = 100_000

#: Copies of a step's float32 logits alive at once (the logits, their log-softmax, the
#: probabilities, and the sampler's or the processors' own).
_COPIES = 4


def available_memory(device=None) -> int:
    """Bytes free on ``device`` (a ``torch.device`` or ``None`` for the host): CUDA's
    free memory, else the host's ``MemAvailable`` (Linux), else the physical pages free."""
    import os

    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_context(prompt_lengths, max_new_tokens: int, context: int | None) -> None:
    """Refuse prompts that, with the answer budget, exceed the model's ``context``
    positions (``None``: unknown, not checked).

    Example:
        >>> check_context([12, 9000], 64, 8192)
        Traceback (most recent call last):
        ...
        ValueError: prompts: prompt 1 has 9000 tokens; with max_new_tokens 64 it needs \
9064 positions, the model has 8192 (shorten it or lower max_new_tokens)
    """
    if not context:
        return
    for index, length in enumerate(prompt_lengths):
        if length + max_new_tokens > context:
            raise ValueError(
                f"prompts: prompt {index} has {length} tokens; with max_new_tokens "
                f"{max_new_tokens} it needs {length + max_new_tokens} positions, the model "
                f"has {context} (shorten it or lower max_new_tokens)"
            )


def check_logits_fit(
    rows: int, vocab: int, *, what: str = "rows", device=None, available: int | None = None
) -> None:
    """Refuse a decode whose step logits (``rows`` x ``vocab`` float32, a few copies)
    would not fit in the memory ``device`` has free (``available`` bytes if given).

    Raises:
        ValueError: naming ``what`` (the settings that make the rows), the need and what
            is available.
    """
    need = rows * vocab * 4 * _COPIES
    free = available_memory(device) if available is None else available
    if need > free:
        raise ValueError(
            f"{what}: {rows} rows of {vocab} logits need about {need / 2**30:.1f} GiB per "
            f"step; {free / 2**30:.1f} GiB is available (ask for fewer)"
        )
