"""notebooks/quickstart.ipynb runs top to bottom on a freshly trained checkpoint and shows its
sample grids and loss curve, so the notebook cannot rot."""

import pathlib
import subprocess

import pytest
from runs import subprocess_env, train_cmd

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
STEPS = 6

pytestmark = pytest.mark.integration  # main.py trains in a subprocess; a Jupyter kernel runs


@pytest.fixture(scope="module")
def trained_workdir(fmnist_dir, tmp_path_factory):
    """The runlocal default trained for a few steps by main.py (loss logged every 2)."""
    workdir = tmp_path_factory.mktemp("notebook") / "fashion_mnist"
    args = [f"--config.train.num_steps={STEPS}", "--config.train.log_every=2"]
    run = subprocess.run(
        train_cmd(workdir, fmnist_dir, *args), env=subprocess_env(), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return workdir


def _images(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_quickstart_notebook_runs_and_shows_grids(trained_workdir, tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat")
    nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient")
    pytest.importorskip("ipykernel", reason="the notebook test needs ipykernel")
    pytest.importorskip("matplotlib", reason="the notebook plots with matplotlib")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(_images(c) for c in nb.cells), "commit the notebook without outputs"

    env = subprocess_env()  # one CPU device, as a notebook user has
    env.update(UVIT_JAX_WORKDIR=str(trained_workdir), JAX_PLATFORMS="cpu")
    env.pop("MPLBACKEND", None)  # the kernel's inline backend must render the figures
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # as Jupyter starts it
    )
    client.execute(env=env)
    nbformat.write(nb, tmp_path / "quickstart.executed.ipynb")  # for a look when this fails

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert f"step={STEPS}" in "".join(_text(c) for c in code), "the checkpoint was not loaded"
    sampled = [c for c in code if "uvit_jax.sample(" in c.source]
    loss = [c for c in code if "EventAccumulator" in c.source]
    assert sampled and _images(sampled[0]) >= 1, "no sample grid in the outputs"
    assert "(80, 28, 28, 1) float32" in _text(sampled[0])
    assert loss and _images(loss[0]) >= 1, "no loss plot in the outputs"
