"""The example notebook (notebooks/train_demo.ipynb) runs top to bottom in a real Jupyter
kernel on the demo data, and the Python API's flag errors are one clear exception."""
import os
import re

import nbformat
import pytest

from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "train_demo.ipynb"


def test_the_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in notebook.cells if cell.cell_type == "code")


def test_the_notebook_runs_top_to_bottom_in_a_kernel(demo_dir, tmp_path, monkeypatch):
    from nbclient import NotebookClient
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("NOTEBOOK_DATA_DIR", str(demo_dir))
    monkeypatch.setenv("NOTEBOOK_MODEL_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("NOTEBOOK_EPOCHS", "4")  # half the notebook's 8: still over 90% on test
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    outputs = [output for cell in code for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert all(cell.execution_count for cell in code)  # every cell ran
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 3  # the grid, the curves, the predictions
    last = "".join(o.get("text", "") for o in code[-1].outputs)
    accuracy = float(re.search(r"test accuracy (\d\.\d+)", last).group(1))
    assert 0.9 <= accuracy <= 1.0, last
    assert (tmp_path / "run" / "results.json").exists()


def test_a_flag_error_in_the_api_is_one_clear_exception(demo_dir, tmp_path):
    from trainer import api
    with pytest.raises(api.ConfigError) as error:
        api.make_config(flagfile=str(REPO / "configs" / "demo.cfg"), data_dir=str(demo_dir),
                        model_dir=str(tmp_path), batch_size=0)
    assert str(error.value) == "flag --batch_size=0: 0 is not a positive integer"
    with pytest.raises(api.ConfigError, match="Unknown command line flag 'learning_rate'"):
        api.make_config(model_dir=str(tmp_path), data_dir=str(demo_dir), learning_rate=0.1)
    config = api.make_config(flagfile=str(REPO / "configs" / "demo.cfg"), data_dir=str(demo_dir),
                             model_dir=str(tmp_path), random_flip=True, train_steps=7)
    assert (config.random_flip, config.train_steps, config.model) == (True, 7, "small_resnet")
    assert os.fspath(tmp_path) == config.model_dir
