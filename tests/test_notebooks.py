"""The notebooks execute end to end in smoke mode (tiny synthetic data, one epoch, CPU), hold no
logic of their own, and are exactly what their template makes: the three variants' and the
study's (ERA_Session8_Norm_Study.ipynb)."""
import importlib.util
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = {"bn": "ERA_Session8_Assignment_BN_v1.ipynb", "ln": "ERA_Session8_Assignment_LayerNorm_v1.ipynb",
             "gn": "ERA_Session8_Assignment_GroupNorm_v1.ipynb"}
STUDY = "ERA_Session8_Norm_Study.ipynb"


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


@pytest.mark.parametrize("norm", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(norm, monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")  # the notebooks' smoke switch
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    committed = (ROOT / NOTEBOOKS[norm]).read_bytes()
    nb = nbformat.read(ROOT / NOTEBOOKS[norm], as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    assert (ROOT / NOTEBOOKS[norm]).read_bytes() == committed  # executed in memory only
    outputs = [output for cell in code_cells(nb) for output in cell.get("outputs", [])]
    text = "".join(output.get("text", "") for output in outputs)
    assert "Total params: 48,736" in text
    assert f"{norm} epoch  1/1" in text
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 3  # images, curves, gallery


@pytest.mark.parametrize("norm", NOTEBOOKS)
def test_notebook_only_imports_and_orchestrates(norm):
    nb = nbformat.read(ROOT / NOTEBOOKS[norm], as_version=4)
    source = "\n".join(cell.source for cell in code_cells(nb))
    assert f"from model_{norm} import Net" in source
    for forbidden in ("class ", "def ", "nn.Conv2d", ".backward(", "optimizer.step"):
        assert forbidden not in source


def _template():
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "scripts" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("norm", [*NOTEBOOKS, "study"])
def test_committed_notebook_is_what_the_template_makes(norm):
    template = _template()
    expected = template.study_notebook() if norm == "study" else template.notebook(norm)
    committed = nbformat.read(ROOT / (STUDY if norm == "study" else NOTEBOOKS[norm]), as_version=4)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in expected.cells]


def test_study_notebook_runs_a_tiny_grid_in_smoke_mode(monkeypatch):
    monkeypatch.setenv("CI", "true")  # the notebook's smoke switch: a tiny grid in a temporary folder
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    committed = (ROOT / STUDY).read_bytes()
    nb = nbformat.read(ROOT / STUDY, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    assert (ROOT / STUDY).read_bytes() == committed  # executed in memory only
    outputs = [output for cell in code_cells(nb) for output in cell.get("outputs", [])]
    text = "".join(output.get("text", "") + output.get("data", {}).get("text/markdown", "") for output in outputs)
    assert "4 of 4 runs finished" in text
    assert "| GN − BN |" in text and "| batch | G=2 | BN |" in text  # Table 2 and Table 3 layouts
    # Smoke mode shows its tiny grid alone: none of the committed results (part two's were shown, once committed).
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 3  # batch, curves, groups
    assert text.count("not run yet") == 3  # ghost, order, remedies


def test_study_notebook_only_loads_and_shows():
    source = "\n".join(cell.source for cell in code_cells(nbformat.read(ROOT / STUDY, as_version=4)))
    assert "from normstudy import plots, study, study_report" in source
    for forbidden in ("class ", "def ", "nn.", ".backward(", "optimizer"):
        assert forbidden not in source


def test_smoke_execution_script_writes_copies_and_leaves_the_notebooks_alone(tmp_path, monkeypatch):
    source = tmp_path / "repo"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "results", "runs", "*.pt"))
    before = (source / NOTEBOOKS["bn"]).read_bytes()
    spec = importlib.util.spec_from_file_location("run_notebooks", source / "scripts" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("CI", "true")
    written = module.main([str(source / NOTEBOOKS["bn"])], smoke=True, out=tmp_path / "smoke")
    assert (source / NOTEBOOKS["bn"]).read_bytes() == before
    assert written == [tmp_path / "smoke" / NOTEBOOKS["bn"]]
    assert "Total params: 48,736" in written[0].read_text()


def test_regenerating_keeps_the_outputs_of_every_cell_the_template_did_not_change(tmp_path):
    # Bug: make_notebooks.py rewrote every notebook without outputs, so the README's command threw
    # away the committed outputs (and dirtied git) even when no cell had changed.
    template = _template()
    committed = (ROOT / NOTEBOOKS["bn"]).read_text(encoding="utf-8")
    path = tmp_path / NOTEBOOKS["bn"]
    path.write_text(committed, encoding="utf-8")
    template.main(["bn"], root=tmp_path)
    assert path.read_text(encoding="utf-8") == committed

    nb = nbformat.reads(committed, as_version=4)
    edited = next(k for k, cell in enumerate(nb.cells) if cell.cell_type == "code" and cell.get("outputs"))
    nb.cells[edited].source += "\n# an edit the template does not have"
    nbformat.write(nb, path)
    template.main(["bn"], root=tmp_path)
    again = nbformat.read(path, as_version=4)
    assert [c.source for c in again.cells] == [c.source for c in template.notebook("bn").cells]
    assert again.cells[edited].outputs == [] and again.cells[edited].id == nb.cells[edited].id
    kept = [k for k, cell in enumerate(nb.cells) if k != edited and cell.cell_type == "code" and cell.outputs]
    assert kept and all(again.cells[k].outputs == nb.cells[k].outputs for k in kept)
