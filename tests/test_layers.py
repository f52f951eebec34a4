"""The layers the design states: the trainer never imports the launcher, the engine's commands live in trainer/cli.py,
and the launcher's own modules (the notebook form, render, estimate, targets, lifecycle) import no torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH_FREE_LAUNCHER = ["launcher.form", "launcher.render", "launcher.estimate", "launcher.targets", "launcher.lifecycle",
                       "launcher.launch", "launcher.cli", "trainer.cli", "trainer.preflight"]


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_nothing_in_the_trainer_imports_the_launcher():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in _imported_modules(p) if m.split(".")[0] == "launcher")
                 for p in (REPO / "trainer").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("module", TORCH_FREE_LAUNCHER)
def test_launcher_side_modules_import_no_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'diffusers', 'peft', 'accelerate') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{module} imports {done.stdout.strip()}"


def test_engine_commands_live_in_the_trainer_and_wanforge_hands_them_over():
    from launcher.cli import build_parser
    from trainer.cli import main as engine_main

    engine = {"demo", "train", "check", "cache", "validate", "export"}
    wanforge = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 (argparse has no public accessor)
    for name in engine:
        assert wanforge[name]._defaults["func"].__module__ == "trainer.cli", name
    with pytest.raises(SystemExit) as stop:  # the engine's own entry point knows only the engine's commands
        engine_main(["launch", "x.toml", "--target", "local"])
    assert stop.value.code == 2


def test_the_node_and_the_images_train_through_the_engine_entry_point():
    from launcher.node import train_command

    assert train_command(Path("/c.toml"))[1:4] == ["-m", "trainer.cli", "train"]
    assert "-m trainer.cli train" in (REPO / "docker" / "start.sh").read_text()


def test_the_model_is_assembled_and_stepped_in_one_place():
    """load -> place -> adapter -> memory options lives in trainer/trainable.py, the micro-step in
    trainer/training_step.py: no other module of the loop, the experts or the benches repeats the sequence or
    reaches for a private step."""
    for path in [*(REPO / "trainer").glob("*.py"), *(REPO / "bench").glob("*.py")]:
        if path.name in ("trainable.py", "memory.py", "lora.py"):
            continue
        text = path.read_text()
        calls = [name for name in ("place_base_model(", "apply_memory_options(") if name in text]
        assert not calls, f"{path.relative_to(REPO)} assembles the model itself ({calls}): use trainer.trainable"
        private = re.findall(r"from trainer\.\w+ import [^\n]*\b_\w+", text)
        assert not private, f"{path.relative_to(REPO)} imports a private name of the trainer: {private}"
