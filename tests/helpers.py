"""Helpers shared by the tests (fixtures are in ``conftest.py``)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["NoHostSync"]


class NoHostSync(TorchDispatchMode):
    """Fails on every op that reads tensor data back to the host."""

    FORBIDDEN = {
        "aten::_local_scalar_dense",
        "aten::item",
        "aten::nonzero",
        "aten::is_nonzero",
        "aten::equal",
        "aten::allclose",
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.FORBIDDEN:
            raise AssertionError(f"host synchronisation in the hot path: {name}")
        if name == "aten::_to_copy" and kwargs and str(kwargs.get("device", "")) == "cpu":
            if any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
                raise AssertionError("device-to-host copy in the hot path")
        return func(*args, **(kwargs or {}))
