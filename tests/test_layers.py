"""The layers the design states: trainer/ is packages by the stage of a run, each importing only the ones below it,
with no import circles anywhere; the trainer never imports the launcher; the engine's commands live in
trainer/cli.py; the launcher's own modules (the notebook form, render, estimate, targets, lifecycle) and the
preflight import no torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH_FREE_LAUNCHER = ["launcher.form.config_form", "launcher.render", "launcher.estimate", "launcher.targets", "launcher.lifecycle",
                       "launcher.launch", "launcher.cli", "trainer.cli", "trainer.preflight.check"]


# trainer/'s packages from the bottom up: each may import only those before it (and itself). "base" is the modules
# directly under trainer/ except cli.py (errors, file writing, flavours, the run folder); cli.py is the top.
LAYERS = ["base", "config", "model", "data", "outputs", "preflight", "loop", "demo", "cli"]
TOP_LEVEL_MODULES_AT_MOST = 8


def _imported_modules(path: Path) -> set[str]:
    """Every module an import in the file names (at the top or inside a function, TYPE_CHECKING ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from trainer.data import cache`
    return names


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, for trainer/ and launcher/."""
    paths = {_module_name(p): p for top in ("trainer", "launcher") for p in (REPO / top).rglob("*.py")}
    return {name: {m for m in _imported_modules(path) if m in paths and m != name} for name, path in paths.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (REPO / "trainer" / parts[1]).is_dir()):
        return parts[1]
    return "cli" if module == "trainer.cli" else "base"


def test_no_import_circles():
    graph, circles = _import_graph(), []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = stack[stack.index(node):]
            del stack[stack.index(node):]
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert circles == []


def test_each_trainer_package_imports_only_the_ones_below_it():
    assert {p.name for p in (REPO / "trainer").iterdir() if p.is_dir() and (p / "__init__.py").exists()} == \
        set(LAYERS) - {"base", "cli"}, "a new package of trainer/ needs its place in LAYERS"
    upward = [f"{module} ({_layer(module)}) imports {dep} ({_layer(dep)})"
              for module, deps in _import_graph().items() if module.startswith("trainer.")
              for dep in deps if dep.startswith("trainer.") and LAYERS.index(_layer(dep)) > LAYERS.index(_layer(module))]
    assert upward == []


def test_few_modules_stay_directly_under_the_trainer():
    top = sorted(p.name for p in (REPO / "trainer").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= TOP_LEVEL_MODULES_AT_MOST, top
    assert "cli.py" in top


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
    """load -> place -> adapter -> memory options lives in trainer/model/trainable.py, the micro-step in
    trainer/loop/training_step.py: no other module of the loop, the experts or the benches repeats the sequence or
    reaches for a private step."""
    for path in [*(REPO / "trainer").rglob("*.py"), *(REPO / "bench").glob("*.py")]:
        if path.name in ("trainable.py", "memory.py", "lora.py"):
            continue
        text = path.read_text()
        calls = [name for name in ("place_base_model(", "apply_memory_options(") if name in text]
        assert not calls, f"{path.relative_to(REPO)} assembles the model itself ({calls}): use trainer.model.trainable"
        private = re.findall(r"from trainer\.[\w.]+ import [^\n]*\b_\w+", text)
        assert not private, f"{path.relative_to(REPO)} imports a private name of the trainer: {private}"
