"""Every notebook runs top to bottom (small settings injected after its parameters cell) and is stored without outputs."""

from __future__ import annotations

import copy
import importlib.util
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
STRIP = ROOT / "tools" / "strip_notebooks.py"

# What CI can afford on 2 CPU cores: a few calibration tokens, a few evaluation windows and a handful of
# small layers (SmolLM2-135M's k/v projections are 192 x 576, q/o 576 x 576). Each notebook's own
# defaults are the real settings; these only check that it runs top to bottom.
SMALL = dict(NSAMPLES=4, SEQLEN=64, N_EVAL_WINDOWS=2)
PARAMS: dict[str, dict[str, object]] = {
    "01_quickstart.ipynb": dict(SMALL, MAX_NEW_TOKENS=8, LAYERS=["model.layers.0.self_attn.[kv]_proj", "model.layers.1.self_attn.[kv]_proj"]),
    "02_layer_sensitivity.ipynb": dict(SMALL, LAYERS=["model.layers.[01].self_attn.*"], SWEEP=[0.3, 0.6, 0.9]),
    "03_mask_patterns.ipynb": dict(NSAMPLES=4, SEQLEN=64, LAYER="model.layers.1.self_attn.k_proj"),
    "04_how_apt_works.ipynb": {},
    # Measuring every run dominates here: one window per corpus, no generations.
    "05_compare_methods.ipynb": dict(SMALL, N_EVAL_WINDOWS=1, LAYERS=["model.layers.0.self_attn.[kv]_proj"], SPECS=["0.5", "2:4"],
                                     PROMPTS=[]),
}


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def parameters_cell(nb: nbformat.NotebookNode) -> int:
    """Index of the cell tagged ``parameters`` (papermill's convention)."""
    hits = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(hits) == 1, f"expected exactly one cell tagged 'parameters', found {len(hits)}"
    return hits[0]


def with_parameters(nb: nbformat.NotebookNode, values: dict[str, object]) -> nbformat.NotebookNode:
    """A copy of ``nb`` with a cell assigning ``values`` right after its parameters cell (as papermill injects)."""
    nb = copy.deepcopy(nb)
    i = parameters_cell(nb)
    defined = _assigned_names(nb.cells[i].source)
    unknown = sorted(set(values) - defined)
    assert not unknown, f"{unknown} are not parameters of this notebook (it defines {sorted(defined)})"
    if values:
        cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
        cell.metadata["tags"] = ["injected-parameters"]
        nb.cells.insert(i + 1, cell)
    return nb


def _assigned_names(source: str) -> set[str]:
    import ast

    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            for t in node.targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names.add(n.id)
    return names


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 900) -> nbformat.NotebookNode:
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    return nb


def test_every_notebook_has_small_ci_settings():
    names = [p.name for p in notebook_paths()]
    assert names == sorted(PARAMS), "each notebook needs an entry in PARAMS (its small CI settings)"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_notebook_runs_top_to_bottom(name, tmp_path):
    nb = with_parameters(nbformat.read(NOTEBOOKS / name, as_version=4), PARAMS[name])
    t0 = time.perf_counter()
    execute(nb, tmp_path)
    seconds = time.perf_counter() - t0
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a code cell did not run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0]
    # Every notebook shows something: a plotly figure (its JSON mime type) or, for the panel, a widget.
    mimes = {k for c in code for o in c.outputs for k in o.get("data", {})}
    assert "application/vnd.plotly.v1+json" in mimes, f"{name} displayed no plotly figure"
    assert list(tmp_path.iterdir()) == [], f"{name} wrote files into its working folder: {list(tmp_path.iterdir())}"
    print(f"{name}: {seconds:.0f} s")


def test_notebooks_in_the_repository_carry_no_outputs():
    dirty = []
    for path in notebook_paths():
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        parameters_cell(nb)
        for i, c in enumerate(nb.cells):
            if c.cell_type == "code" and (c.outputs or c.execution_count is not None):
                dirty.append(f"{path.name} cell {i}")
        if "widgets" in nb.metadata:
            dirty.append(f"{path.name} metadata.widgets")
    assert not dirty, f"notebooks have stored outputs; run `python tools/strip_notebooks.py`: {dirty}"


def _strip_main():
    spec = importlib.util.spec_from_file_location("strip_notebooks", STRIP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_strip_script_removes_outputs_and_check_mode_reports_them(tmp_path, capsys):
    strip_main = _strip_main()
    src = NOTEBOOKS / "04_how_apt_works.ipynb"
    nb = nbformat.read(src, as_version=4)
    i = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells[i].execution_count = 3
    nb.cells[i].outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    nb.cells[i].metadata["execution"] = {"iopub.status.busy": "2024-01-01T00:00:00"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    dirty = tmp_path / "dirty.ipynb"
    nbformat.write(nb, dirty)

    assert strip_main(["--check", str(dirty)]) == 1
    assert "dirty.ipynb" in capsys.readouterr().out
    assert nbformat.read(dirty, as_version=4).cells[i].outputs  # --check changes nothing

    assert strip_main([str(dirty)]) == 0
    clean = nbformat.read(dirty, as_version=4)
    cell = clean.cells[i]
    assert (cell.outputs, cell.execution_count, "execution" in cell.metadata) == ([], None, False)
    assert "widgets" not in clean.metadata
    assert [c.source for c in clean.cells] == [c.source for c in nb.cells]  # the code is untouched
    assert strip_main(["--check", str(dirty)]) == 0
