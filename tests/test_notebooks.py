"""The notebooks in ``notebooks/``: each jupytext pair in sync, and each one
run top to bottom at small settings (any cell error fails the test).

A notebook's ``parameters`` cell holds its sizes; CI overrides them by running
an extra cell right after it (the papermill convention), so the committed
notebooks keep their full-size settings.
"""
import os

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from notebooks import run  # pylint: disable=wrong-import-position
from tests.conftest import REPO_ROOT, shared_data_dir  # pylint: disable=wrong-import-position

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
SOURCES = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))

# Small settings each notebook runs with here (Python source, one per line).
CI_PARAMETERS = {
    "01_quickstart": 'DATASET = "cifar10_jpeg"\nTV_STEPS = (0, 1, 3)',
    "02_pde_gcn_cora": "NUM_EPOCHS = 3\nSEEDS = 1",
    "03_stable_vs_standard_tpu": (
        'DATASET = "cifar10_jpeg"\nMODELS = ("resnet8", "stable_resnet8")\n'
        "CPU_DEVICES = 2\nNUM_EPOCHS = 2\nVAL_FRACTION = 0.01\n"
        "START_BITS = 5\nEPOCHS_PER_STEP = 1\nMAX_TRAIN = 128\nMAX_TEST = 100\n"
        "BATCH_SIZE = 32\nCONSISTENCY_EXAMPLES = 100"),
    "04_deploy": (
        'DATASET = "cifar10_jpeg"\nMODEL = "resnet8"\nNUM_EPOCHS = 2\n'
        "START_BITS = 5\nEPOCHS_PER_STEP = 1\nBATCH_SIZE = 32\n"
        "MAX_TRAIN = 128\nVAL_FRACTION = 0.01\nMAX_TEST = 64"),
}


def _cells(nb):
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_every_notebook_has_ci_parameters_and_a_pair():
  assert SOURCES, f"no notebooks in {NOTEBOOK_DIR}"
  assert sorted(p.stem for p in SOURCES) == sorted(CI_PARAMETERS)
  for source in SOURCES:
    assert source.with_suffix(".ipynb").exists(), (
        f"{source.name} has no paired .ipynb; run "
        f"`jupytext --to ipynb {source.relative_to(REPO_ROOT)}`")


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_pair_in_sync_and_outputs_stripped(source):
  paired = source.with_suffix(".ipynb")
  from_py = jupytext.read(source)
  from_ipynb = nbformat.read(paired, as_version=4)
  assert _cells(from_py) == _cells(from_ipynb), (
      f"{paired.name} differs from {source.name}; regenerate it with "
      f"`jupytext --to ipynb {source.relative_to(REPO_ROOT)}`")
  for cell in from_ipynb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"{paired.name} is committed with outputs; strip them")


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs(source, tmp_path, monkeypatch):
  monkeypatch.setenv("PDEQ_DATA_DIR", str(shared_data_dir()))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", "")
  # raises CellExecutionError naming the failing cell
  _, seconds = run.execute(source, CI_PARAMETERS[source.stem], cwd=tmp_path,
                           timeout=600)
  print(f"{source.stem}: {seconds:.1f} s")
  assert os.environ["PYTHONPATH"] == ""  # the runner restored it


def test_kernel_pythonpath_is_set_for_the_kernel_only(monkeypatch):
  monkeypatch.setenv("PYTHONPATH", "/somewhere")
  with run._checkout_first_on_pythonpath():  # pylint: disable=protected-access
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [
        str(run.REPO_ROOT), "/somewhere"]
  assert os.environ["PYTHONPATH"] == "/somewhere"
  monkeypatch.delenv("PYTHONPATH")
  with run._checkout_first_on_pythonpath():  # pylint: disable=protected-access
    assert os.environ["PYTHONPATH"] == str(run.REPO_ROOT)
  assert "PYTHONPATH" not in os.environ


def test_parameters_cell_is_required(tmp_path):
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
  with pytest.raises(ValueError, match="exactly one 'parameters' cell"):
    run.with_parameters(nb, "x = 2")
