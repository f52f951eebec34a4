"""What runs ON the training node (inside the trainer image, or here for `--target local`): no SkyPilot needed.

The SkyPilot task's `setup:` runs `python -m launcher.node setup`, its `run:` runs `python -m launcher.node run`.
Everything is read from the environment the task sets:

    RUN_NAME          the run folder's name: <WANFORGE_OUTPUTS>/<RUN_NAME>, and its name in the bucket / Hub repo
    WANFORGE_OUTPUTS  where run folders live on the node (default /outputs; a mounted bucket in mount mode)
    WANFORGE_ROOT     where the task copied its inputs (default /wanforge): input/config.toml, input/data/<i>/
    HUB_DATASET       optional Hugging Face dataset id: downloaded on the node and used as datasets[0]
    OUTPUT            hf://USER/REPO or s3://BUCKET/PREFIX the node uploads to (OUTPUT_MODE=upload)
    OUTPUT_MODE       mount (the bucket is the folder) | upload (the node uploads as it goes) | node (stays here)
    UPLOAD_EVERY_MIN  minutes between uploads while training (default 15)
    SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS, SKYPILOT_NUM_NODES, SKYPILOT_NUM_GPUS_PER_NODE: multi-node start

Preemption: a managed job starts `run` again on a new node; `run` first brings back the run folder (mount: already
there; upload: downloaded from the bucket / Hub) and always trains with `--resume latest`, which is a fresh start
when no finished checkpoint exists. The trainer takes SKYPILOT_TASK_ID (stable across recoveries) as its run id.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from trainer.config import load_config, save_config
from trainer.errors import UserError

MASTER_PORT = 29500


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, "") or default


def root() -> Path:
    return Path(env("WANFORGE_ROOT", "/wanforge"))


def run_dir() -> Path:
    return Path(env("WANFORGE_OUTPUTS", "/outputs")) / env("RUN_NAME", "wanforge")


def node_config() -> Path:
    return root() / "config.toml"


# ---------------------------------------------------------------- setup: the config and the data


def fetch_hub_dataset(repo_id: str, into: Path) -> Path:
    """A Hub dataset repo (clips + captions) downloaded once into `into` (snapshot_download skips what is there)."""
    from huggingface_hub import snapshot_download

    repo_id = repo_id.removeprefix("hf://").removeprefix("datasets/")
    return Path(snapshot_download(repo_id=repo_id, repo_type="dataset", local_dir=str(into)))


def prepare_config() -> Path:
    """The uploaded config with the node's paths: datasets -> the copied (or downloaded) folders, output -> run dir."""
    source = root() / "input" / "config.toml"
    if not source.is_file():
        raise UserError(f"{source}: no config was copied to the node (sky launch ... --env CONFIG=path/to/config.toml)")
    cfg = load_config(source)
    for i, ds in enumerate(cfg.datasets):
        copied = root() / "input" / "data" / str(i)
        if i == 0 and env("HUB_DATASET"):
            ds.path = fetch_hub_dataset(env("HUB_DATASET"), root() / "hub-dataset")
        elif copied.exists():
            ds.path = copied.resolve()
        elif not ds.path.is_dir():
            raise UserError(f"datasets[{i}].path: {ds.path} is not on this node; upload it (the launcher does, or "
                            f"sky launch --env DATASET=folder) or give a Hub dataset id (HUB_DATASET)")
        if ds.cache_dir is not None and not ds.cache_dir.is_dir():
            ds.cache_dir = None  # a cache folder of the laptop: rebuilt on the node beside the data
    cfg.train.output_dir = run_dir()
    save_config(cfg, node_config())
    return node_config()


def setup() -> None:
    if env("OUTPUT_MODE") == "upload" and env("OUTPUT").startswith("s3://") and shutil.which("aws") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "awscli"], check=True)
    path = prepare_config()
    print(f"wanforge node: config {path}, run folder {run_dir()}", flush=True)


# ---------------------------------------------------------------- outputs: upload and bring back


def _hub_repo(output: str) -> str:
    return output.removeprefix("hf://").strip("/")


def _s3_url(output: str, name: str) -> str:
    return output.rstrip("/") + "/" + name


def upload(folder: Path, output: str, name: str) -> None:
    """Push the run folder to <output>/<name>: a Hub repo subfolder (pruned checkpoints deleted there too) or an S3 prefix."""
    if output.startswith("hf://"):
        from huggingface_hub import HfApi

        api = HfApi()
        repo = _hub_repo(output)
        api.create_repo(repo, private=True, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), path_in_repo=name,
                          delete_patterns=["checkpoints/**"], ignore_patterns=["checkpoints/.tmp-*/**"],
                          commit_message=f"wanforge: {name}")
    elif output.startswith("s3://"):
        subprocess.run(["aws", "s3", "sync", "--delete", "--exclude", "checkpoints/.tmp-*", str(folder),
                        _s3_url(output, name)], check=True)
    else:
        raise UserError(f"OUTPUT={output}: the node uploads to hf://USER/REPO or s3://BUCKET/PREFIX only")


def download(output: str, name: str, folder: Path) -> None:
    """Bring a run folder back from where `upload` put it (resume after preemption, or `wanforge sync`)."""
    folder.mkdir(parents=True, exist_ok=True)
    if output.startswith("hf://"):
        from huggingface_hub import snapshot_download

        from huggingface_hub import HfApi

        if not HfApi().repo_exists(_hub_repo(output)):
            return  # a first run: nothing uploaded yet
        staging = folder.parent / f".{folder.name}.hub"
        snapshot_download(repo_id=_hub_repo(output), allow_patterns=[f"{name}/**"], local_dir=str(staging))
        if (staging / name).is_dir():
            shutil.copytree(staging / name, folder, dirs_exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    elif output.startswith("s3://"):
        subprocess.run(["aws", "s3", "sync", _s3_url(output, name), str(folder)], check=True)
    else:
        raise UserError(f"{output}: runs come back from hf://USER/REPO or s3://BUCKET/PREFIX only")


class Uploader:
    """Uploads the run folder every few minutes in the background while training runs (rank 0 only)."""

    def __init__(self, folder: Path, output: str, name: str, every_s: float):
        self.folder, self.output, self.name, self.every_s = folder, output, name, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.push("periodic")

    def push(self, why: str) -> None:
        try:
            upload(self.folder, self.output, self.name)
            print(f"wanforge node: uploaded {self.folder} to {self.output} ({why})", flush=True)
        except Exception as err:  # an upload hiccup must not kill a training run; the next one retries
            print(f"wanforge node: upload to {self.output} failed ({why}): {type(err).__name__}: {err}", flush=True)

    def __enter__(self) -> Uploader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.push("final")


# ---------------------------------------------------------------- training: one process, or accelerate on many


def train_command(config: Path) -> list[str]:
    """`wanforge train` for one GPU; `accelerate launch` over all GPUs of all nodes from SkyPilot's variables."""
    nodes = int(env("SKYPILOT_NUM_NODES", "1"))
    gpus = int(env("SKYPILOT_NUM_GPUS_PER_NODE", "1") or 1)
    train = ["-m", "launcher.cli", "train", str(config), "--resume", "latest"]
    if nodes * gpus <= 1:
        return [sys.executable, *train]
    ips = [ip for ip in env("SKYPILOT_NODE_IPS", "127.0.0.1").splitlines() if ip.strip()]
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_machines", str(nodes), "--machine_rank", env("SKYPILOT_NODE_RANK", "0"),
        "--main_process_ip", ips[0], "--main_process_port", str(MASTER_PORT),
        "--num_processes", str(nodes * gpus), *train,
    ]


def run() -> int:
    config = node_config()
    if not config.is_file():
        config = prepare_config()
    folder, output, mode = run_dir(), env("OUTPUT"), env("OUTPUT_MODE", "node")
    rank0 = env("SKYPILOT_NODE_RANK", "0") == "0"
    if mode == "upload" and output and not (folder / "checkpoints").is_dir():
        download(output, env("RUN_NAME", "wanforge"), folder)  # a recovered managed job: carry on from the uploaded checkpoint
    cmd = train_command(config)
    print(f"wanforge node: {' '.join(cmd)}", flush=True)
    if mode == "upload" and output and rank0:
        with Uploader(folder, output, env("RUN_NAME", "wanforge"), float(env("UPLOAD_EVERY_MIN", "15")) * 60):
            return subprocess.call(cmd)
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if args == ["setup"]:
            setup()
            return 0
        if args == ["run"]:
            return run()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("usage: python -m launcher.node setup|run  (inside a wanforge SkyPilot task)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
