"""The command line end to end on a tiny random model saved to a temp folder."""

from __future__ import annotations

import csv
import json
import random

import pytest

from apt_viz import PruningPlan
from apt_viz.cli import main
from test_models import _save_tiny_llama


@pytest.mark.parametrize("extra", [["--sparsity", "0.5"], ["--pattern", "2:4", "--sequential"]])
def test_cli_prune_writes_every_report_file(tmp_path, extra, capsys):
    model_dir = _save_tiny_llama(tmp_path / "model")
    rng = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{rng.randrange(20)}" for _ in range(3000)))
    report = tmp_path / "report"
    rc = main(["prune", "--model", str(model_dir), "--method", "apt", *extra, "--calib", str(text), "--eval", str(text),
               "--nsamples", "4", "--seqlen", "32", "--nwindows", "4", "--report", str(report)])
    assert rc == 0
    assert {p.name for p in report.iterdir()} == {"plan.json", "summary.json", "layers.csv", "generations.md"}
    plan = PruningPlan.from_json((report / "plan.json").read_text())
    assert plan.method == "apt"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["ppl_dense"] > 1 and summary["ppl_pruned"] > 1
    rows = list(csv.DictReader((report / "layers.csv").open()))
    assert len(rows) == 14 and all(abs(float(r["sparsity"]) - 0.5) < 1 / 32 for r in rows)
    assert str(report.resolve()) in capsys.readouterr().out
