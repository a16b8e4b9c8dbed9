"""docs/tutorial.ipynb: made from docs/tutorial.py (jupytext percent format, the source), committed without
outputs, and run top to bottom in a fresh kernel within its time budget (marked slow: it needs MNIST and about
two minutes)."""
import time
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

DOCS = Path(__file__).parents[1] / "docs"
SOURCE, NOTEBOOK = DOCS / "tutorial.py", DOCS / "tutorial.ipynb"
BUDGET_SECONDS = 600  # the bound on 2 cores; it takes about two minutes


def cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_the_committed_notebook_is_the_source_converted_and_has_no_outputs():
    committed = jupytext.read(NOTEBOOK)
    assert cells(committed) == cells(jupytext.read(SOURCE)), \
        "docs/tutorial.ipynb is out of date: run  jupytext --to ipynb docs/tutorial.py"
    code = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert "without outputs" in committed.cells[0].source  # and the first cell says why


def test_the_shipped_scope_model_is_small_and_loads():
    from vitscope import PRESETS, load_run

    folder = DOCS / "models" / "scope"
    assert sum(p.stat().st_size for p in folder.iterdir()) < 2_000_000
    model, config = load_run(folder)
    assert config.patch_size == PRESETS["scope"].model.patch_size and config.depth == PRESETS["scope"].model.depth


@pytest.mark.slow
def test_the_tutorial_runs_top_to_bottom_within_its_budget_and_draws_its_figures():
    notebook = jupytext.read(SOURCE)
    start = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=BUDGET_SECONDS, kernel_name="python3",
                            resources={"metadata": {"path": str(DOCS)}}).execute()
    seconds = time.perf_counter() - start
    assert seconds < BUDGET_SECONDS
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]
    assert len(images) >= 6  # the patches, 4 analysis figures, the rollout of a picked and a drawn digit
    print(f"tutorial executed in {seconds:.0f} s; slowest cells:")
    for took, first_line in sorted(cell_seconds(notebook), reverse=True)[:5]:
        print(f"  {took:5.1f} s  {first_line}")


def cell_seconds(notebook) -> list[tuple[float, str]]:
    """(seconds, first line) of each executed code cell, from the timestamps nbclient records."""
    from datetime import datetime

    timed = []
    for cell in notebook.cells:
        stamps = cell.metadata.get("execution", {})
        if "iopub.execute_input" in stamps and "shell.execute_reply" in stamps:
            start, end = (datetime.fromisoformat(stamps[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            timed.append(((end - start).total_seconds(), cell.source.splitlines()[0]))
    return timed
