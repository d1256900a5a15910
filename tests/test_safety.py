"""Untrusted files and saves: no pickle loading, remote code off by default, strict JSON schemas, atomic writes."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import apt_viz
from apt_viz import LayerResult, PlanError, PruningPlan
from apt_viz.checks import ModelError, ReportError
from apt_viz.atomic import atomic_write as _atomic_write

PACKAGE = Path(apt_viz.__file__).parent


# --------------------------------------------------------------------------- no pickle, no remote code


def package_sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}


FORBIDDEN = {
    "torch.load": r"\btorch\.load\s*\(",
    "pickle": r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib)\b|\b(c?pickle|dill|cloudpickle|joblib)\.loads?\s*\(",
    "weights_only=False": r"weights_only\s*=\s*False",
    "allow_pickle=True": r"allow_pickle\s*=\s*True",
    "trust_remote_code on": r"trust_remote_code\s*(:\s*bool\s*)?=\s*True",
    "use_safetensors off": r"use_safetensors\s*=\s*False",
}


@pytest.mark.parametrize("what", list(FORBIDDEN))
def test_package_never_unpickles_or_trusts_remote_code(what):
    sources = package_sources()
    assert len(sources) >= 10 and "runner.py" in sources  # the grep really sees the package
    hits = [f"{name}:{i}: {line.strip()}" for name, text in sources.items()
            for i, line in enumerate(text.splitlines(), 1) if re.search(FORBIDDEN[what], line)]
    assert hits == []


def test_the_grep_would_catch_a_violation():
    bad = ["m = torch.load(path)", "import pickle", "x = pickle.loads(b)", "torch.load(f, weights_only=False)",
           "def f(trust_remote_code: bool = True):", "from_pretrained(p, trust_remote_code=True)"]
    for line in bad:
        assert any(re.search(rx, line) for rx in FORBIDDEN.values()), line


def test_trust_remote_code_defaults_off_everywhere():
    from apt_viz.cli import _parser
    from apt_viz.models import load_model

    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    args = _parser().parse_args(["prune", "--calib", "x.txt"])
    assert args.trust_remote_code is False


def _save_tiny(folder: Path) -> Path:
    from conftest import word_llama, word_tokenizer

    tok = word_tokenizer(16)
    word_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_load_model_reads_safetensors_only(tmp_path, monkeypatch):
    from apt_viz import models

    calls = []
    real = models.AutoModelForCausalLM

    class Recorder:
        @staticmethod
        def from_pretrained(*a, **k):
            calls.append(k)
            return real.from_pretrained(*a, **k)

    monkeypatch.setattr(models, "AutoModelForCausalLM", Recorder)
    folder = _save_tiny(tmp_path / "tiny")
    assert (folder / "model.safetensors").is_file()
    models.load_model(folder)
    assert calls[-1]["use_safetensors"] is True and calls[-1]["trust_remote_code"] is False


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path, monkeypatch):
    from apt_viz import models

    folder = _save_tiny(tmp_path / "tiny")
    (folder / "model.safetensors").unlink()
    # A pickle whose loading would run code: it must never be opened.
    (folder / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelError, match=r"only pickle weights \(pytorch_model\.bin\).*convert the folder to safetensors"):
        models.load_model(folder)


# --------------------------------------------------------------------------- JSON schemas


@pytest.mark.parametrize("data,msg", [
    ([], "must be a JSON object"),
    ({"method": "apt", "sparsity": 0.5, "extra": 1}, r"unknown keys \['extra'\]"),
    ({"overrides": {"*.q_proj": {"sparsity": 0.5, "colour": "red"}}}, r"overrides\['\*\.q_proj'\] has unknown keys \['colour'\]"),
    ({"overrides": {"*.q_proj": 0.5}}, "must be a JSON object"),
    ({"overrides": {"*.q_proj": {"sparsity": "0.5"}}}, "sparsity has the wrong type str"),
    ({"overrides": {"*.q_proj": {"method": 3}}}, "method has the wrong type int"),
    ({"sparsity": "0.5"}, "sparsity has the wrong type str"),
    ({"sparsity": True}, "sparsity has the wrong type bool"),
    ({"sparsity": float("nan")}, r"\[0, 1\)"),
    ({"blocksize": 128.0}, "blocksize has the wrong type float"),
    ({"blocksize": True}, "blocksize has the wrong type bool"),
    ({"include": "*.mlp.*"}, "include has the wrong type str"),
    ({"include": ["*.mlp.*", 3]}, "include must be a list of name globs"),
    ({"sequential": "yes"}, "sequential has the wrong type str"),
    ({"percdamp": [0.01]}, "percdamp has the wrong type list"),
    ({"pattern": 24}, "pattern has the wrong type int"),
])
def test_plan_json_schema_rejects_unknown_keys_and_wrong_types(data, msg):
    with pytest.raises(PlanError, match=msg):
        PruningPlan.from_json(json.dumps(data))


def test_plan_json_round_trip_and_garbage():
    plan = PruningPlan(method="wanda", sparsity=0.6, exclude=["*.down_proj"], overrides={"*.q_proj": {"pattern": "2:4"}})
    assert PruningPlan.from_json(plan.to_json()) == plan
    with pytest.raises(PlanError, match="not valid JSON"):
        PruningPlan.from_json('{"method": "apt",')


RESULT = LayerResult(name="model.layers.0.mlp.up_proj", block=0, kind="up_proj", shape=(128, 64), method="apt",
                     pattern="unstructured", target=0.5, sparsity=0.5, rel_error=0.01, error=1.5, loss=0.75, damp=0.02,
                     seconds=0.1, tokens=256)


def test_layer_result_json_round_trip():
    assert LayerResult.from_dict(json.loads(json.dumps(RESULT.to_dict()))) == RESULT


@pytest.mark.parametrize("change,msg", [
    ({"colour": "red"}, r"unknown keys \['colour'\]"),
    ({"tokens": None}, "tokens has the wrong type NoneType"),
    ({"tokens": 3.5}, "tokens has the wrong type float"),
    ({"block": True}, "block has the wrong type bool"),
    ({"sparsity": "0.5"}, "sparsity has the wrong type str"),
    ({"shape": [128]}, r"two positive integers \[out, in\]"),
    ({"shape": "128x64"}, "shape has the wrong type str"),
    ({"method": "obs"}, "not one of magnitude, wanda, sparsegpt, apt"),
    ({"target": 1.5}, r"fraction in \[0, 1\]"),
    ({"error": float("nan")}, "error is NaN"),
])
def test_layer_result_json_schema_rejects_bad_records(change, msg):
    data = {**RESULT.to_dict(), **change}
    with pytest.raises(ReportError, match=msg):
        LayerResult.from_dict(data)


def test_layer_result_json_missing_key():
    data = RESULT.to_dict()
    del data["damp"]
    with pytest.raises(ReportError, match=r"lacks \['damp'\].*LayerResult\.to_dict"):
        LayerResult.from_dict(data)


# --------------------------------------------------------------------------- atomic writes


def leftovers(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


def test_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "plan.json"
    target.write_text("old")
    _atomic_write(target, "new")
    assert target.read_text() == "new" and leftovers(tmp_path, "plan.json") == []


def test_exception_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "plan.json"
    target.write_text('{"old": true}')
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError("disk full")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: HalfWriter(real_fdopen(fd, *a, **k)))
    with pytest.raises(OSError, match="disk full"):
        _atomic_write(target, json.dumps({"new": list(range(1000))}))
    assert target.read_text() == '{"old": true}'
    assert leftovers(tmp_path, "plan.json") == []  # the temporary file was removed


def test_failure_at_rename_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def no_rename(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="rename failed"):
        _atomic_write(target, "new")
    assert target.read_text() == "old" and leftovers(tmp_path, "summary.json") == []


def test_process_killed_mid_write_leaves_the_old_file(tmp_path):
    """A hard crash (no cleanup runs) half way through the write: the old file is intact and complete."""
    target = tmp_path / "layers.csv"
    target.write_text("old,complete\n")
    # The child runs the real atomic_write from atomic.py's source, without importing torch (seconds saved).
    script = textwrap.dedent(f"""
        import ast, os, tempfile
        from pathlib import Path

        src = Path({str(PACKAGE / "atomic.py")!r}).read_text()
        fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "atomic_write")
        exec(compile(ast.Module([fn], []), "atomic.py", "exec"))

        real = os.fdopen

        class Dying:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *e): pass
            def write(self, text):
                self.f.write(text[:100]); self.f.flush()
                os._exit(3)  # the process dies here, like a kill -9

        os.fdopen = lambda fd, *a, **k: Dying(real(fd, *a, **k))
        atomic_write(Path({str(target)!r}), "new\\n" * 10000)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert target.read_text() == "old,complete\n"
    # Only a hidden temporary file may remain; the next successful write is unaffected by it.
    assert all(name.startswith(".layers.csv.") for name in leftovers(tmp_path, "layers.csv"))
    _atomic_write(target, "new\n")
    assert target.read_text() == "new\n"
