"""Rehearse a RunPod launch on this GPU machine: the rendered task run as a pod runs it, then `wanforge sync` back.

Renders the RunPod task for a 1.3B-shape config (random weights, bench/gpu_smoke.py's builder), places its inputs
where its file_mounts put them, sets the variables SkyPilot sets on a one-node pod plus the task's envs and secret,
runs `setup` then `run` with bash, uploading to the local Hub test server (tests/hub_server.py) in this process;
then `wanforge sync RUN` brings the run back from that "Hub" and the synced folder is compared file by file with the
node's. Prints (and writes to --out/rehearsal.json) time to the first step, the upload volume and time, the sync time.

    python3 bench/cloud_rehearsal.py --work /tmp/rehearsal --steps 4 --out $OUT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()
            and not p.relative_to(folder).as_posix().startswith(("checkpoints/.tmp-", ".hub-staging/"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/rehearsal"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("/tmp/rehearsal-out"))
    args = ap.parse_args()
    work, out = args.work, args.out
    out.mkdir(parents=True, exist_ok=True)
    from gpu_smoke import build_model, make_clips  # noqa: E402 (bench/ on the path)
    from hub_server import FakeHub

    from launcher import render
    from launcher.lifecycle import LaunchRecord, save_record
    from launcher.targets import check_request

    if not (work / "model" / "model_index.json").exists():
        build_model(work / "model")
    make_clips(work / "clips")
    from trainer.config.files import config_from_dict, save_config

    config = work / "rehearsal.toml"
    save_config(config_from_dict({
        "model": {"flavour": "t2v-480p-1.3b-2.1", "pretrained_model_name_or_path": str(work / "model")},
        "datasets": [{"path": str(work / "clips"), "num_frames": 81, "width": 832, "height": 480}],
        "lora": {"rank": 16}, "validation": {"at_end": False},
        "train": {"output_dir": str(work / "laptop-run"), "max_train_steps": args.steps},
        "checkpoint": {"every_n_steps": max(args.steps // 2, 1)},
    }), config)
    name = "wf-rehearsal"
    plan = check_request("runpod", "H100", 1, output="hf://me/rehearsal")
    task = render.render_task(plan, name, config, [work / "clips"], secrets=["HF_TOKEN"])
    (out / "task.yaml").write_text(render.dump(task))

    # file_mounts: the destinations the task names (on a pod, root writes them); the sources copied there
    for dest, source in task["file_mounts"].items():
        dest_path = Path(dest)
        if dest_path.exists():
            shutil.rmtree(dest_path) if dest_path.is_dir() else dest_path.unlink()
        dest_path.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if Path(source).is_dir() else shutil.copy2)(source, dest_path)
    outputs = Path(task["envs"]["WANFORGE_RUNS_DIR"])
    shutil.rmtree(outputs / name, ignore_errors=True)

    with FakeHub() as hub:
        env = {**os.environ, **{k: str(v) for k, v in task["envs"].items()},
               "HF_TOKEN": "hf_rehearsal_token", "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
               "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "127.0.0.1\n", "SKYPILOT_NUM_NODES": "1",
               "SKYPILOT_NUM_GPUS_PER_NODE": "1", "SKYPILOT_TASK_ID": f"sky-2026-11-25-rehearsal_{name}_1",
               "SKYPILOT_CLUSTER_INFO": json.dumps({"cluster_name": name, "cloud": "runpod", "num_nodes": 1}),
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "PYTHONUNBUFFERED": "1"}
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        setup = subprocess.run(["bash", "-c", task["setup"]], env=env, cwd=ROOT)
        timings["setup_s"] = time.perf_counter() - t0
        assert setup.returncode == 0, f"setup exited {setup.returncode}"

        metrics = outputs / name / "metrics.jsonl"
        first_step = threading.Event()

        def watch(started: float) -> None:
            while not first_step.is_set():
                if metrics.is_file() and any('"loss"' in line for line in metrics.read_text().splitlines()):
                    timings["run_to_first_step_s"] = time.perf_counter() - started
                    first_step.set()
                time.sleep(0.2)

        t1 = time.perf_counter()
        threading.Thread(target=watch, args=(t1,), daemon=True).start()
        proc = subprocess.Popen(["bash", "-c", task["run"]], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        log = []
        for line in proc.stdout:  # type: ignore[union-attr]
            stamp = time.perf_counter() - t1
            sys.stdout.write(line)
            log.append(f"{stamp:8.1f} {line}")
        code = proc.wait()
        first_step.set()
        timings["run_s"] = time.perf_counter() - t1
        (out / "node.log").write_text("".join(log))
        assert code == 0, f"run exited {code}"
        node_folder = outputs / name
        status = json.loads((node_folder / "run.json").read_text())
        hub_files = hub.files.get("me/rehearsal", {})
        timings["hub_bytes"] = sum(len(v) for k, v in hub_files.items() if k.startswith(f"{name}/"))
        final = [line for line in log if "(final, verified)" in line]

        # wanforge sync, as on the laptop: the launch record of a RunPod run uploading to the Hub
        state = work / "state"
        env_sync = {**env, "WANFORGE_STATE_DIR": str(state)}
        os.environ["WANFORGE_STATE_DIR"] = str(state)
        synced = out / "synced"
        shutil.rmtree(synced, ignore_errors=True)
        save_record(LaunchRecord(name=name, target="runpod", managed=False, output=plan.output, output_mode="upload",
                                 remote=f"{name}:{render.NODE_OUTPUTS}/{name}", local_dir=str(synced)))
        t2 = time.perf_counter()
        sync = subprocess.run([sys.executable, "-m", "launcher.cli", "sync", name], env=env_sync, cwd=ROOT)
        timings["sync_s"] = time.perf_counter() - t2
        assert sync.returncode == 0, f"sync exited {sync.returncode}"

    node_d, synced_d = digests(node_folder), digests(synced)
    result = {
        "status": status.get("status"), "steps": status.get("step"), "timings": timings,
        "final_upload_line": final[-1].strip() if final else None,
        "node_files": len(node_d), "node_bytes": sum(p.stat().st_size for p in node_folder.rglob("*") if p.is_file()),
        "synced_equals_node": node_d == synced_d,
        "only_on_node": sorted(set(node_d) - set(synced_d)), "only_synced": sorted(set(synced_d) - set(node_d)),
        "different": sorted(k for k in set(node_d) & set(synced_d) if node_d[k] != synced_d[k]),
        "commits": len(hub.commits),
    }
    print(json.dumps(result, indent=2))
    (out / "rehearsal.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
