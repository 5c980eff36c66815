"""Every script in examples/ runs; the core imports without the optional extras;
the overhead benchmark reports ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples():
    assert EXAMPLES


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, embedded):
    proc = subprocess.run(
        [sys.executable, str(script), "--max-new-tokens", "12"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()


def test_core_imports_without_optional_packages():
    blocked = ["vllm", "outlines", "outlines_core", "sklearn", "matplotlib", "pandas", "sympy"]
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
import tokur_decode, tokur_decode.core.signals, tokur_decode.core.aggregate, tokur_decode.core.trace
import tokur_decode.hf, tokur_decode.models, tokur_decode.cli, tokur_decode.bench.hf
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_the_server_client_imports_without_vllm():
    """A client of a server needs no vLLM: ``tokur_decode.RemoteBackend`` and the request
    settings import where ``import vllm`` fails; an engine-side name says what to
    install (the control: in the same process vLLM really is out of reach)."""
    code = """
import sys
sys.modules['vllm'] = None  # import vllm fails, as where it is not installed
import tokur_decode
import tokur_decode.vllm as tv
print(tokur_decode.RemoteBackend.__name__, tv.uncertainty_args(['entropy']))
for attempt in ('tv.llm', 'import vllm'):
    try:
        exec(attempt)
    except ImportError as e:
        print(attempt, 'refused:', e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "RemoteBackend {'tokur_signals': 'entropy'}"
    assert lines[1].startswith("tv.llm refused: tokur_decode.vllm.llm needs vLLM: pip install")
    assert lines[2].startswith("import vllm refused:")


def test_overhead_benchmark_reports_ratios_against_same_run_baseline():
    from transformers import PreTrainedTokenizerFast

    from tokur_decode.bench.hf import monitor_overhead
    from tokur_decode.models import tiny_model

    model = tiny_model("llama", vocab_size=128)
    tok = _tiny_tokenizer(PreTrainedTokenizerFast)
    res = monitor_overhead(model, tok, batch_size=2, max_new_tokens=4, repeats=2)
    assert len(res.ratios) == 2 and all(r > 0 for r in res.ratios)
    assert res.monitor_step > 0 and res.step_ratio > 1
    assert res.median_ratio == pytest.approx(sorted(res.ratios)[0] / 2 + sorted(res.ratios)[1] / 2)


def _tiny_tokenizer(cls):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(127)} | {"<eos>": 127}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return cls(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


@pytest.mark.slow
def test_wheel_ships_the_strategy_recipes(tmp_path):
    import zipfile

    from tokur_decode.strategies.recipe import available

    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for recipe in available():
        assert f"tokur_decode/strategies/recipes/{recipe}.toml" in names, recipe
