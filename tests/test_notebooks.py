"""Both notebooks executed headless (nbclient, a real IPython kernel) in their CPU tiny mode."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def _outputs(nb: nbformat.NotebookNode) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", ""))
            data = out.get("data", {})
            text += [str(data.get("text/plain", "")), str(data.get("text/html", ""))]
    return "\n".join(text)


@pytest.fixture
def kernel_env(tmp_path, monkeypatch, wanforge_home):
    """The kernel inherits this environment: the session's tiny model, a private launch state, offline."""
    monkeypatch.setenv("WANFORGE_STATE_DIR", str(tmp_path / "launches"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU tiny mode even on a machine with a GPU
    return tmp_path


def _execute(name: str, folder: Path) -> nbformat.NotebookNode:
    shutil.copy(NOTEBOOKS / name, folder / name)
    nb = nbformat.read(folder / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    nbformat.write(nb, folder / name)  # kept in the test's folder for a look after a failure
    return nb


def test_walkthrough_runs_end_to_end(kernel_env):
    nb = _execute("01_walkthrough.ipynb", kernel_env)
    text = _outputs(nb)
    run = kernel_env / "wanforge-walkthrough" / "run"
    assert "problems: none" in text
    assert "tiny is a CPU trial" in text and "0.0 GiB" not in text  # the estimate of the tiny model
    assert "completed: step 10/10" in text
    assert (run / "lora" / "wanforge_lora.safetensors").is_file()
    videos = sorted(run.glob("validation/step-*/*.mp4"))
    assert videos and "data:video/mp4;base64," in text  # played inline
    assert (kernel_env / "wanforge-walkthrough" / "config.toml").is_file()
    assert any(p.suffix == ".json" for p in (kernel_env / "launches").iterdir())  # launched through `wanforge launch`


def test_colab_quick_trial_cpu_tiny_mode(kernel_env):
    nb = _execute("colab_quick_trial.ipynb", kernel_env)
    text = _outputs(nb)
    assert "not Colab" in text and "CPU tiny mode" in text
    assert "tiny: 64x64x9" in text
    assert "completed: step 10/10" in text
    run = kernel_env / "wanforge-trial" / "run"
    assert (run / "lora" / "wanforge_lora.safetensors").is_file()
    assert "data:video/mp4;base64," in text


@pytest.mark.parametrize("name", ["01_walkthrough.ipynb", "colab_quick_trial.ipynb"])
def test_no_cell_deletes_a_folder_unasked(name):
    """A folder is deleted only with FRESH_RUN = True (off by default), and only inside the notebook's own WORK."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert "FRESH_RUN = False" in nb.cells[1].source
    deleting = [c.source for c in nb.cells if c.cell_type == "code" and "rmtree" in c.source]
    for source in deleting:
        guard, delete = source.index("if FRESH_RUN and"), source.index("shutil.rmtree(")
        assert guard < source.index(".resolve() not in run_folder.parents") < delete
    assert not any(word in c.source for c in nb.cells for word in ("os.remove", "unlink(", "rmdir("))
