"""What runs ON the training node (inside the trainer image, or here for `--target local`): no SkyPilot needed.

The SkyPilot task's `setup:` runs `python -m launcher.node setup`, its `run:` runs `python -m launcher.node run`.
Everything is read from the environment the task sets:

    RUN_NAME          the run folder's name: <WANFORGE_RUNS_DIR>/<RUN_NAME>, and its name in the bucket / Hub repo
    WANFORGE_RUNS_DIR  where run folders live on the node (default /outputs; a mounted bucket in mount mode)
    WANFORGE_ROOT     where the task copied its inputs (default /wanforge): input/config.toml, input/data/<i>/
    HUB_DATASET       optional Hugging Face dataset id: downloaded on the node and used as datasets[0]
    OUTPUT            hf://USER/REPO or s3://BUCKET/PREFIX the node uploads to (OUTPUT_MODE=upload)
    OUTPUT_MODE       mount (the bucket is the folder) | upload (the node uploads as it goes) | node (stays here)
    UPLOAD_EVERY_MIN  minutes between uploads while training (default 15)
    KEEP_ALIVE_MIN    minutes the node stays up after a final upload that failed (pod targets: 60), so
                      `wanforge sync RUN --from-node` can still fetch the run folder
    SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS, SKYPILOT_NUM_NODES, SKYPILOT_NUM_GPUS_PER_NODE: multi-node start
    MASTER_PORT       the rendezvous port on the first node (default 29500)

RUN_NAME and OUTPUT are checked here as `wanforge launch` checks them. The final upload is retried and verified;
if it fails, run.json says `upload_failed` (with the remedy), the node waits KEEP_ALIVE_MIN and exits 3.

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
import time
from pathlib import Path

from launcher.targets import check_output, check_run_name
from trainer.config.files import load_config, save_config
from trainer.errors import UserError

MASTER_PORT = 29500


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, "") or default


def root() -> Path:
    return Path(env("WANFORGE_ROOT", "/wanforge"))


def run_dir() -> Path:
    return Path(env("WANFORGE_RUNS_DIR", "/outputs")) / env("RUN_NAME", "wanforge")


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
    _, output, mode = checked_env()
    if mode == "upload" and output.startswith("s3://") and shutil.which("aws") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "awscli"], check=True)
    path = prepare_config()
    print(f"wanforge node: config {path}, run folder {run_dir()}", flush=True)


# ---------------------------------------------------------------- outputs: upload and bring back

UPLOAD_FAILED_EXIT = 3  # the run trained but its folder did not reach OUTPUT (run.json status upload_failed)
_SKIP = ("checkpoints/.tmp-", ".hub-staging/")  # half-written checkpoints, the trainer's own Hub staging copies


def _skipped(rel: str) -> bool:
    return rel.startswith(_SKIP)


def _hub_repo(output: str) -> str:
    return output.removeprefix("hf://").strip("/")


def _s3_url(output: str, name: str) -> str:
    return output.rstrip("/") + "/" + name


def _s3_listing(url: str) -> dict[str, int]:
    """key relative to url -> size, from `aws s3 ls --recursive` (lines: DATE TIME SIZE KEY)."""
    done = subprocess.run(["aws", "s3", "ls", "--recursive", url.rstrip("/") + "/"], capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 1: nothing there
        raise RuntimeError(f"aws s3 ls {url} failed: {done.stderr.strip()[-300:]}")
    base = url.split("://", 1)[1].partition("/")[2].rstrip("/")
    listed = {}
    for line in done.stdout.splitlines():
        fields = line.split(None, 3)
        if len(fields) == 4 and fields[2].isdigit():
            key = fields[3]
            listed[key[len(base) + 1:] if base and key.startswith(base + "/") else key] = int(fields[2])
    return listed


def upload_once(folder: Path, output: str, name: str, verify: bool = False) -> None:
    """Push the run folder to <output>/<name> once: a Hub repo subfolder (pruned checkpoints deleted there too) or an S3
    prefix; with verify, the files are then listed back and compared (path and size)."""
    from trainer.outputs.hub import local_files, verify_uploaded

    if output.startswith("hf://"):
        from huggingface_hub import HfApi

        api = HfApi()
        repo = _hub_repo(output)
        api.create_repo(repo, private=True, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), path_in_repo=name,
                          delete_patterns=["checkpoints/**"], ignore_patterns=[f"{p}*/**" for p in _SKIP],
                          commit_message=f"wanforge: {name}")
        if verify:
            verify_uploaded(api, repo, local_files(folder, name, _skipped))
    elif output.startswith("s3://"):
        url = _s3_url(output, name)
        excludes = [arg for p in _SKIP for arg in ("--exclude", f"{p}*")]
        # an S3-compatible store: AWS_ENDPOINT_URL, read by the CLI itself
        subprocess.run(["aws", "s3", "sync", "--delete", *excludes, str(folder), url], check=True)
        if verify:
            expected, listed = local_files(folder, "", _skipped), _s3_listing(url)
            missing = [k for k, size in expected.items() if listed.get(k) != size]
            if missing:
                from trainer.outputs.hub import UploadNotVerified

                raise UploadNotVerified(f"{url} does not list {len(missing)} uploaded file(s), e.g. {missing[:3]}")
    else:
        raise UserError(f"OUTPUT={output}: the node uploads to hf://USER/REPO or s3://BUCKET/PREFIX only")


def upload(folder: Path, output: str, name: str, verify: bool = False) -> None:
    """upload_once with retries and exponential backoff (trainer.outputs.hub.with_retries)."""
    from trainer.outputs.hub import with_retries

    with_retries(f"upload of {folder} to {output}", lambda: upload_once(folder, output, name, verify))


def download(output: str, name: str, folder: Path) -> None:
    """Bring a run folder back from where `upload` put it (resume after preemption, or `wanforge sync`).

    An unreachable output (no network, a bad token, a bucket that does not exist) is one UserError line."""
    output = check_output(output, "OUTPUT")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _download(output, name, folder)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as err:
        from trainer.outputs.hub import first_line

        token = " (HF_TOKEN must be a token that can read and write it)" if output.startswith("hf://") else \
            " (check the AWS keys / AWS_ENDPOINT_URL)"
        raise UserError(f"OUTPUT={output}: cannot read {name}/ there: {first_line(err)[:300]}{token}") from None


def _download(output: str, name: str, folder: Path) -> None:
    if output.startswith("hf://"):
        from huggingface_hub import HfApi, snapshot_download

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


def _webhooks(name: str):
    """The config's webhooks (tracking.webhook_config) where that file is on the node; None otherwise."""
    from trainer.outputs.webhooks import Webhooks

    try:
        path = load_config(node_config()).tracking.webhook_config
        return Webhooks.from_config(path, name) if path is not None else None
    except (UserError, OSError, ValueError):
        return None


class Uploader:
    """Uploads the run folder every few minutes in the background while training runs (rank 0 only).

    A failed periodic upload is logged and sent to the config's webhook, and the next one tries again; the final
    upload is retried with backoff and verified (`final_error` says why it did not make it)."""

    def __init__(self, folder: Path, output: str, name: str, every_s: float):
        self.folder, self.output, self.name, self.every_s = folder, output, name, every_s
        self.final_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._webhooks = _webhooks(name)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.push("periodic")

    def push(self, why: str) -> str | None:
        """One upload (the final one retried and verified); returns the failure line, or None."""
        from trainer.outputs.hub import first_line, local_files

        started = time.perf_counter()
        try:
            if why == "final":
                upload(self.folder, self.output, self.name, verify=True)
            else:
                upload_once(self.folder, self.output, self.name)
            sizes = local_files(self.folder, "", _skipped)
            print(f"wanforge node: uploaded {self.folder} to {self.output} ({why}{', verified' if why == 'final' else ''}"
                  f"): {len(sizes)} files, {sum(sizes.values()) / 2**20:.1f} MiB in {time.perf_counter() - started:.1f} s",
                  flush=True)
            return None
        except Exception as err:  # an upload hiccup must not kill a training run; the next one retries
            line = f"upload of {self.folder} to {self.output} failed ({why}): {first_line(err)[:500]}"
            print(f"wanforge node: {line}", flush=True)
            if self._webhooks is not None:
                self._webhooks.send("error", line)
            return line

    def __enter__(self) -> Uploader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.final_error = self.push("final")
        if self._webhooks is not None:
            self._webhooks.close()


def upload_failed(folder: Path, error: str) -> None:
    """run.json says the run did not reach OUTPUT, with what to do; `wanforge status` / `sync` show it."""
    from trainer.rundir import RunDir

    name = env("RUN_NAME", "wanforge")
    remedy = (f"the run folder is still on the node at {folder}: bring it back with `wanforge sync {name} --from-node` "
              f"while the node is up (KEEP_ALIVE_MIN), fix the output's credentials, then upload it again")
    RunDir(folder).write_status(status="upload_failed", error=error[:2000], remedy=remedy)
    print(f"wanforge node: run status upload_failed: {error}\nwanforge node: {remedy}", flush=True)


def keep_alive(minutes: float) -> None:
    """A pod is deleted once its job ends: stay up so `wanforge sync --from-node` can still fetch the run folder."""
    if minutes <= 0:
        return
    print(f"wanforge node: keeping this node up {minutes:g} min (KEEP_ALIVE_MIN) so `wanforge sync "
          f"{env('RUN_NAME', 'wanforge')} --from-node` can fetch the run folder; `wanforge down` ends it sooner",
          flush=True)
    time.sleep(minutes * 60)


# ---------------------------------------------------------------- training: one process, or accelerate on many


def _whole(name: str, default: str, low: int) -> int:
    text = env(name, default).strip()
    if not text.isdigit() or int(text) < low:
        raise UserError(f"{name}={text!r}: must be a whole number >= {low} (SkyPilot sets it on every node)")
    return int(text)


def _layout() -> tuple[int, int, int, list[str]]:
    """(nodes, GPUs per node, this node's rank, node IPs) from SkyPilot's variables, checked where several processes
    train (one process needs neither its rank nor the IPs)."""
    nodes = _whole("SKYPILOT_NUM_NODES", "1", 1)
    gpus = _whole("SKYPILOT_NUM_GPUS_PER_NODE", "1", 1)
    if nodes * gpus <= 1:
        return nodes, gpus, 0, []
    rank = _whole("SKYPILOT_NODE_RANK", "0", 0)
    ips = [ip.strip() for ip in env("SKYPILOT_NODE_IPS", "127.0.0.1").splitlines() if ip.strip()]
    if rank >= nodes or len(ips) < nodes:
        raise UserError(f"SKYPILOT_NODE_RANK={rank} with SKYPILOT_NUM_NODES={nodes} and {len(ips)} line(s) in "
                        "SKYPILOT_NODE_IPS: the rank must be below the node count and every node needs its IP line")
    return nodes, gpus, rank, ips


def train_command(config: Path) -> list[str]:
    """`wanforge train` for one GPU; torchrun over all GPUs of all nodes from SkyPilot's variables.

    torchrun (static rendezvous at the first IP of SKYPILOT_NODE_IPS, port MASTER_PORT or 29500) and not
    `accelerate launch --multi_gpu`: the same command then runs on CPU (gloo, the rehearsal in tests/test_multiprocess.py)
    and on GPUs (NCCL), and it is the path the 2-GPU runs were measured with (bench/gpu_smoke.py --torchrun)."""
    nodes, gpus, rank, ips = _layout()
    train = ["-m", "trainer.cli", "train", str(config), "--resume", "latest"]
    if nodes * gpus <= 1:
        return [sys.executable, *train]
    port = _whole("MASTER_PORT", str(MASTER_PORT), 1)
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nodes}", f"--node_rank={rank}", f"--nproc_per_node={gpus}",
        f"--master_addr={ips[0]}", f"--master_port={port}", *train,
    ]


SOCKET_INTERFACE_VARIABLES = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")


def interface_toward(host: str) -> str:
    """The name of this machine's network interface that reaches `host`: the kernel's route picks the source address
    (a UDP socket "connected" to the host sends nothing), and the interface holding that address is the answer. On
    the head node its own IP gives the interface that holds it (eth0, say: where the other nodes reach it), a loopback
    address gives the loopback interface."""
    import socket

    import psutil

    try:
        family, _, _, _, address = socket.getaddrinfo(host, MASTER_PORT, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            local = probe.getsockname()[0].split("%", 1)[0]
    except OSError as err:  # an unresolvable name, no route
        raise UserError(f"SKYPILOT_NODE_IPS: this node cannot reach the head node {host} ({err}): check the nodes "
                        "share a network, or pin the interface with --env NCCL_SOCKET_IFNAME=NAME "
                        "--env GLOO_SOCKET_IFNAME=NAME") from None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == family and a.address.split("%", 1)[0] == local for a in addresses):
            return name
    raise UserError(f"no network interface of this node holds {local}, its address toward the head node {host}: pin "
                    "the interface with --env NCCL_SOCKET_IFNAME=NAME --env GLOO_SOCKET_IFNAME=NAME")


def train_env() -> dict[str, str]:
    """The environment of the training command. Across nodes, NCCL and Gloo are pinned to the interface toward the
    head node (Gloo otherwise resolves this host's name, often to 127.0.1.1, and the rendezvous hangs); values the task
    already sets win. One node: the environment as it is."""
    nodes, _, _, ips = _layout()
    out = dict(os.environ)
    if nodes > 1 and not all(out.get(name) for name in SOCKET_INTERFACE_VARIABLES):
        interface = interface_toward(ips[0])
        for name in SOCKET_INTERFACE_VARIABLES:
            out[name] = out.get(name) or interface
    return out


def checked_env() -> tuple[str, str, str]:
    """RUN_NAME, OUTPUT, OUTPUT_MODE from the task, checked as `wanforge launch` checks them (a hand-written task or
    an edited --env is held to the same rules)."""
    name = check_run_name(env("RUN_NAME", "wanforge"), "RUN_NAME", folder_only=True)
    mode = env("OUTPUT_MODE", "node")
    if mode not in ("mount", "upload", "node"):
        raise UserError(f"OUTPUT_MODE={mode}: use mount, upload or node")
    output = check_output(env("OUTPUT"), "OUTPUT") if env("OUTPUT") else ""
    if mode == "upload" and not output:
        raise UserError("OUTPUT_MODE=upload needs OUTPUT=hf://USER/REPO or s3://BUCKET/PREFIX")
    return name, output, mode


def run() -> int:
    name, output, mode = checked_env()
    config = node_config()
    if not config.is_file():
        config = prepare_config()
    folder = run_dir()
    rank0 = env("SKYPILOT_NODE_RANK", "0") == "0"
    if mode == "upload" and not (folder / "checkpoints").is_dir():
        download(output, name, folder)  # a recovered managed job: carry on from the uploaded checkpoint
    cmd, child_env = train_command(config), train_env()
    pinned = " ".join(f"{k}={child_env[k]}" for k in SOCKET_INTERFACE_VARIABLES if child_env.get(k))
    print(f"wanforge node: {pinned + ' ' if pinned else ''}{' '.join(cmd)}", flush=True)
    if not (mode == "upload" and rank0):
        code = subprocess.call(cmd, env=child_env)
    else:
        with Uploader(folder, output, name, float(env("UPLOAD_EVERY_MIN", "15")) * 60) as uploader:
            code = subprocess.call(cmd, env=child_env)
        if uploader.final_error is not None:
            if code == 0:
                upload_failed(folder, uploader.final_error)
            keep_alive(float(env("KEEP_ALIVE_MIN", "0") or 0))
            return code or UPLOAD_FAILED_EXIT
    if code == 0 and rank0 and _status(folder) == "upload_failed":  # the trainer's push_to_hub did not verify
        return UPLOAD_FAILED_EXIT
    return code


def _status(folder: Path) -> str:
    from trainer.rundir import RunDir

    try:
        return str(RunDir(folder).read_status().get("status", ""))
    except ValueError:
        return ""


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
