"""A per-request setting is a field of ``Recording``, declared once; the keyword of
``plan``/``generate``, the CLI flag and vLLM's flat key are derived from it. Each test
walks every field, so a new one that one entry forgets fails here."""

import dataclasses
import inspect

import pytest

from tokur_decode.cli import build_parser
from tokur_decode.core.recording import Recording
from tokur_decode.hf import UncertaintyMonitor
from tokur_decode.strategies import backend as B
from tokur_decode.strategies.run import plan

#: A non-default, valid value and an invalid one for every field.
VALUES = {"alternatives": (3, 99)}


def test_every_field_has_example_values():
    assert set(VALUES) == set(Recording.names())


@pytest.mark.parametrize("name", Recording.names())
def test_plan_keyword_reaches_the_request(name):
    good, bad = VALUES[name]
    checked = plan((B.StopAct,), "q", **{name: good})
    assert getattr(checked.recording, name) == good
    with pytest.raises(ValueError, match=f"^{name}: "):
        plan((B.StopAct,), "q", **{name: bad})


def test_plan_refuses_an_unknown_keyword():
    with pytest.raises(ValueError, match="^alternative: not a setting"):
        plan((B.StopAct,), "q", alternative=3)


@pytest.mark.parametrize("name", Recording.names())
def test_flat_vllm_key_reaches_the_processor_settings(name):
    pytest.importorskip("vllm")
    from tokur_decode.vllm.args import parse_settings, uncertainty_args

    good, bad = VALUES[name]
    assert (
        getattr(parse_settings(uncertainty_args("entropy", **{name: good})).recording, name) == good
    )
    assert Recording(**{name: good}).to_flat("tokur_") == {f"tokur_{name}": good}
    with pytest.raises(ValueError, match=f"^tokur_{name}: "):
        parse_settings({"tokur_signals": "entropy", f"tokur_{name}": bad})
    # the control: without the key the request records the default
    assert parse_settings({"tokur_signals": "entropy"}).recording == Recording()


@pytest.mark.parametrize("command", [["generate", "q"], ["bench", "overhead"]])
@pytest.mark.parametrize("name", Recording.names())
def test_cli_flag(command, name):
    good, bad = VALUES[name]
    flag = "--" + name.replace("_", "-")
    args = build_parser().parse_args([*command, flag, str(good)])
    assert Recording.from_flags(args)[name] == good
    args = build_parser().parse_args([*command, flag, str(bad)])
    with pytest.raises(ValueError, match=f"^{flag}: "):
        Recording.from_flags(args)


def test_the_monitor_takes_every_field():
    """The transformers backend hands the recording to the monitor as keywords."""
    params = inspect.signature(UncertaintyMonitor).parameters
    for f in dataclasses.fields(Recording):
        assert f.name in params and params[f.name].default == f.default
