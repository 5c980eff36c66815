"""Settings checked once, where they enter, with an error naming the key: TokUR's
options (the caller's and the CLI's over the recipe's [tokur] table, key by key, over
the backend's own; a vLLM engine's honoured, not ignored) and the adaptive resample rule
(the recipe and the transformers processor check it the same way)."""

from __future__ import annotations

import types

import pytest

from tokur_decode.core.perturbation import PerturbationConfig, checked_options
from tokur_decode.strategies.recipe import Strategy
from tokur_decode.strategies.run import generate as run_generate
from tokur_decode.strategies.run import plan

RECIPE = {
    "name": "tokur-table",
    "signals": ["tokur", "entropy"],
    "tokur": {"samples": 4, "rank": 2},
}


def _plan(**kw):
    from tokur_decode.hf import HFBackend

    return plan(HFBackend.acts, ["q"], signals=["tokur"], **kw)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"samples": 0}, r"tokur: samples must be a positive integer, got 0"),
        ({"rank": -3}, r"tokur: rank must be a positive integer, got -3"),
        ({"smaples": 4}, r"tokur: unknown option\(s\) \['smaples'\]"),
        ({"sigma": float("nan")}, r"tokur: sigma must be a number >= 0"),
    ],
)
def test_bad_options_are_refused_where_they_enter_naming_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        _plan(tokur=options)
    with pytest.raises(ValueError, match=message):
        Strategy.from_dict({**RECIPE, "tokur": options})
    assert _plan(tokur={"samples": 4}).tokur == {"samples": 4}  # control


def test_the_callers_keys_override_the_recipes_and_the_rest_is_kept():
    from tokur_decode.hf import HFBackend

    recipe = Strategy.from_dict(RECIPE)
    ready = plan(HFBackend.acts, ["q"], strategy=recipe, tokur={"rank": 3})
    assert ready.tokur == {"samples": 4, "rank": 3}
    assert plan(HFBackend.acts, ["q"], strategy=recipe).tokur == {"samples": 4, "rank": 2}
    assert _plan().tokur is None  # nothing given: the backend's own


def test_options_without_the_signal_are_refused():
    from tokur_decode.hf import HFBackend

    with pytest.raises(ValueError, match="tokur: options given but 'tokur' is not among"):
        plan(HFBackend.acts, ["q"], signals=["entropy"], tokur={"samples": 4})


def test_a_config_object_is_taken_whole():
    options = checked_options(PerturbationConfig(samples=3))
    assert options["samples"] == 3 and options["rank"] == 8 and len(options) == 8


def _vllm_backend(built: dict):
    """A VLLMBackend over a stand-in engine whose TokUR was built with ``built``."""
    pytest.importorskip("vllm")
    from tokur_decode.vllm import VLLMBackend, tokur_engine_args

    overrides = tokur_engine_args(**built)["hf_overrides"]
    config = overrides(types.SimpleNamespace(architectures=["LlamaForCausalLM"]))
    engine = types.SimpleNamespace(
        llm_engine=types.SimpleNamespace(model_config=types.SimpleNamespace(hf_config=config))
    )
    return VLLMBackend(engine)


def test_on_vllm_a_request_carries_its_sigma_and_cannot_change_the_engines_options():
    from tokur_decode.strategies.backend import Request, Sampling

    backend = _vllm_backend({"samples": 4, "rank": 2})
    sampling = Sampling(max_new_tokens=4)

    def settings(tokur):
        return backend._tokur_settings(Request(("tokur",), sampling, tokur=tokur))

    assert settings({"sigma": 0.3}) == {"sigma": 0.3}  # travels per request
    assert settings({"samples": 4, "rank": 2}) == {}  # the engine's own: fine
    assert settings(None) == {}
    with pytest.raises(ValueError, match=r"built with samples=4; a request cannot change"):
        settings({"samples": 10})
    with pytest.raises(ValueError, match=r"\['decode', 'seed'\]"):
        settings({"seed": 1, "decode": "mean"})


def test_generate_on_vllm_refuses_a_recipe_table_the_engine_was_not_built_with():
    backend = _vllm_backend({"samples": 4})
    backend.has_tokur = lambda: True
    recipe = Strategy.from_dict({**RECIPE, "tokur": {"samples": 6}})
    with pytest.raises(ValueError, match=r"built with samples=4"):  # before any request
        run_generate(backend, ["q"], strategy=recipe, max_new_tokens=2)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"min_temperature": 0}, r"action\.min_temperature: must be > 0"),
        ({"min_p": 1.5}, r"action\.min_p: must be in \[0, 1\)"),
        ({"min_temperature": 3.0}, r"action\.max_temperature: must be >= min_temperature"),
    ],
)
def test_the_adaptive_resample_rule_is_checked_once_for_recipes_and_processors(rule, message):
    """The recipe's [action] table and the transformers processor check it the same way
    (the recipe used to accept what the processor refused later)."""
    from tokur_decode.core.policy import Trigger
    from tokur_decode.hf.actions import ResampleOnTrigger

    recipe = {
        "name": "adaptive",
        "signals": ["entropy"],
        "trigger": {"signal": "entropy", "threshold": 2.0},
        "action": {"type": "resample", "mode": "adaptive", **rule},
    }
    with pytest.raises(ValueError, match=message):
        Strategy.from_dict(recipe)
    with pytest.raises(ValueError, match=message):
        ResampleOnTrigger(Trigger("entropy", threshold=2.0), "adaptive", **rule)
    Strategy.from_dict({**recipe, "action": {"type": "resample", "mode": "adaptive"}})  # control


def test_top_p_and_temperature_are_checked_by_one_rule_naming_each_entrys_key():
    from tokur_decode.strategies.backend import Sampling

    with pytest.raises(ValueError, match=r"^top_p: must be in \(0, 1\], got 0$"):
        Sampling(max_new_tokens=4, top_p=0)
    with pytest.raises(ValueError, match=r"^temperature: must be a finite number >= 0"):
        Sampling(max_new_tokens=4, temperature=float("nan"))
    with pytest.raises(ValueError, match=r"^generation\.top_p: must be in \(0, 1\]"):
        Strategy.from_dict({"name": "g", "generation": {"top_p": 1.5}})
    best_of_n = {"type": "best-of-n", "score": "max_prob", "top_p": 0.0}
    with pytest.raises(ValueError, match=r"^action\.top_p: must be in \(0, 1\]"):
        Strategy.from_dict({"name": "b", "signals": ["max_prob"], "action": best_of_n})
    Sampling(max_new_tokens=4, temperature=0.7, top_p=0.9)  # control


def test_mistaken_api_inputs_are_refused_naming_them():
    """prompts=None, mismatched token ids to bayesian_decomposition, and tokur_sigma on
    a request without TokUR: each a ValueError naming the input (a TypeError, a torch
    error and a misleading 'a number >= 0, got 0.5' before)."""
    import torch

    from tokur_decode.core.signals import bayesian_decomposition
    from tokur_decode.strategies import backend as B
    from tokur_decode.strategies.run import plan

    with pytest.raises(ValueError, match="prompts: a string or a list of strings, got NoneType"):
        plan((B.StopAct,), None)
    assert plan((B.StopAct,), iter(["q"])).prompts == ["q"]  # the control: any iterable
    samples = torch.randn(2, 3, 4, 10)  # [B, T, M, V]
    with pytest.raises(ValueError, match=r"token_ids: one per position, shape \(2, 3\)"):
        bayesian_decomposition(samples, torch.zeros(3, 2, dtype=torch.long))
    assert bayesian_decomposition(samples, torch.zeros(2, 3, dtype=torch.long))["reward"].shape == (
        2,
        3,
    )
    vllm_args = pytest.importorskip("tokur_decode.vllm.args")
    with pytest.raises(ValueError, match="tokur_sigma: only for a request whose signals include"):
        vllm_args.parse_settings({"tokur_signals": "entropy", "tokur_sigma": 0.5})
