"""Two gloo processes (torchrun on CPU) train exactly like one process with the same global batch, a checkpoint
written by two ranks resumes on one, and the multi-node command launcher/node.py builds from SkyPilot's variables,
run as two one-process "nodes" on loopback, trains like both."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from tests.conftest import tiny_config
from trainer.config.files import save_config


def _metric(run: Path, name: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[name] for r in rows if name in r}


def _losses(run: Path) -> dict[int, float]:
    return _metric(run, "loss")


# How close "exactly like one process" can be in fp32. Measured on this test's runs: the losses are bitwise equal and
# the gradients differ by at most ~1e-7 of each tensor's largest element (about one fp32 ulp of it; thousands of ulps
# of its small elements): the two layouts compute and sum the same gradients in different orders (two micro-batches
# accumulated into .grad by one process, against one micro-batch per rank averaged by gloo's all-reduce), so fp32
# rounds differently. Two consequences set the tolerances:
# - grad_norm: ||dg|| / ||g|| stays near 1e-7 (measured 8e-8): rel 1e-5. It is also the check that would catch ranks
#   that sum instead of average (x2), which AdamW hides from the weights (its update is invariant to gradient scale).
# - weights: AdamW moves each element by about lr per step whatever its gradient's scale (m / sqrt(v) is ~1), so two
#   runs differ by sum(lr_t) x the difference of those normalised updates. An element whose gradient is k times smaller
#   than its tensor's largest has a relative gradient error of ~k x 1e-7, so k up to 1e4 gives 1e-3: atol =
#   1e-3 x sum(lr_t) (2.1e-6 here; measured 1.8e-7). A skipped, repeated or reordered step moves elements by ~lr_t, at
#   least 1e-4 here: 50x the tolerance.
UPDATE_NOISE = 1e-3


def _train(args: list[str], processes: int = 1) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    done = subprocess.run([*launcher, "-m", "trainer.cli", "train", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-20000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rendered_task(config: Path, nodes: int, gpus: int) -> list[str]:
    """Every "node" runs the rendered multi-node task's own `run:` script (launcher/render.py, as in sky/multinode.yaml)
    with its SkyPilot variables, on this machine: bash -> launcher/node.py run -> torchrun (+ the pinned interfaces)
    -> wanforge train. Returns each node's command line as launcher/node.py printed it."""
    from launcher.render import template_task

    script = template_task("multinode")["run"]
    run_name, runs_dir = config.stem, config.parent
    common = {"SKYPILOT_NUM_NODES": str(nodes), "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus),
              "SKYPILOT_NODE_IPS": "\n".join(["127.0.0.1"] * nodes), "MASTER_PORT": str(_free_port()),
              "OMP_NUM_THREADS": "1", "WANFORGE_PYTHON": sys.executable, "RUN_NAME": run_name,
              "WANFORGE_RUNS_DIR": str(runs_dir), "OUTPUT_MODE": "node", "OUTPUT": ""}
    procs = []
    for rank in range(nodes):
        root = runs_dir / f"{run_name}-node{rank}"  # the node's WANFORGE_ROOT, its staged config already there
        root.mkdir()
        (root / "config.toml").write_text(config.read_text())
        node_env = {**os.environ, **common, "SKYPILOT_NODE_RANK": str(rank), "WANFORGE_ROOT": str(root)}
        for name in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
            node_env.pop(name, None)
        procs.append(subprocess.Popen(["bash", "-c", script], env=node_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-20000:]
    return [next(line for line in output.splitlines() if line.startswith("wanforge node: ")) for output in outputs]


def _config(clips, root: Path, name: str, steps: int, accumulation: int, checkpoint_every: int = 2) -> Path:
    cfg = tiny_config(clips, root / name, train={"max_train_steps": steps, "train_batch_size": 1,
                                                 "gradient_accumulation_steps": accumulation, "log_every_n_steps": 1},
                      checkpoint={"every_n_steps": checkpoint_every}, validation={"at_end": False, "every_n_steps": 1000})
    save_config(cfg, root / f"{name}.toml")
    return root / f"{name}.toml"


@pytest.fixture(scope="module")
def one_process(clips, tmp_path_factory) -> Path:
    """One process, 6 steps of 2 accumulated micro-batches: the global batch of two processes."""
    root = tmp_path_factory.mktemp("one_process")
    _train([str(_config(clips, root, "one", 6, 2))])
    return root / "one"


@pytest.fixture(scope="module")
def runs(clips, one_process, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multiprocess")
    paths = {"one": one_process, "two": root / "two"}
    _train([str(_config(clips, root, "two", 4, 1))], processes=2)
    paths["two_checkpoints"] = sorted(p.name for p in (root / "two" / "checkpoints").iterdir())
    # the two-rank run continues on one process: same global batch as 2 micro-batches accumulated
    _train([str(root / "two.toml"), "--resume", "latest", "--set", "train.max_train_steps=6",
            "--set", "train.gradient_accumulation_steps=2"])
    return paths


@pytest.fixture(scope="module")
def node_runs(clips, one_process, tmp_path_factory) -> dict:
    """The multi-node rehearsal and the one-node two-process run it must match, both through the rendered task at
    the same settings (no checkpoints: the rehearsal is about the launch; checkpoints under several ranks are the
    tests above)."""
    root = tmp_path_factory.mktemp("multinode")
    pair = _run_rendered_task(_config(clips, root, "pair", 4, 1, checkpoint_every=1000), nodes=1, gpus=2)
    commands = _run_rendered_task(_config(clips, root, "nodes", 4, 1, checkpoint_every=1000), nodes=2, gpus=1)
    return {"one": one_process, "pair": root / "pair", "nodes": root / "nodes", "commands": commands,
            "pair_command": pair[0]}


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    one, two = _losses(runs["one"]), _losses(runs["two"])
    assert runs["two_checkpoints"] == ["step-2", "step-4"]  # written once, by rank 0
    for step in (1, 2, 3, 4):
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
        assert _metric(runs["two"], "grad_norm")[step] == pytest.approx(
            _metric(runs["one"], "grad_norm")[step], rel=1e-5), step


def test_checkpoint_from_two_ranks_resumes_on_one(runs):
    one, two = _losses(runs["one"]), _losses(runs["two"])
    for step in (5, 6):
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    assert _metric(runs["two"], "lr") == _metric(runs["one"], "lr")
    tolerance = UPDATE_NOISE * sum(_metric(runs["one"], "lr").values())
    a = load_file(str(runs["one"] / "lora" / "wanforge_lora.safetensors"))
    b = load_file(str(runs["two"] / "lora" / "wanforge_lora.safetensors"))
    assert a.keys() == b.keys()
    assert max(a[key].abs().max() for key in a) > 100 * tolerance  # the LoRA moved: the comparison means something
    for key in a:
        assert (a[key] - b[key]).abs().max() <= tolerance, key


def test_multinode_command_from_skypilot_variables_trains_like_one_node(node_runs):
    """The rehearsal: two "nodes" of one process each (node ranks 0 and 1, loopback rendezvous, gloo pinned to the
    interface toward the head node: here the loopback one). Same ranks, same data shards and the same gloo all-reduce
    as the one-node two-process run, so the losses agree to float32 rounding (rel 1e-6); against one process
    accumulating the two micro-batches, only the summation order of the gradients differs (rel 1e-4, as above)."""
    rank0, rank1 = node_runs["commands"]
    assert "torch.distributed.run --nnodes=2 --node_rank=0 --nproc_per_node=1 --master_addr=127.0.0.1" in rank0
    assert rank0.replace("--node_rank=0", "--node_rank=1").replace("-node0/", "-node1/") == rank1  # its own copy
    lo = next(name for name, addresses in psutil.net_if_addrs().items() if any(a.address == "127.0.0.1" for a in addresses))
    assert rank0.startswith(f"wanforge node: NCCL_SOCKET_IFNAME={lo} GLOO_SOCKET_IFNAME={lo} ")  # derived on the node
    assert "SOCKET_IFNAME" not in node_runs["pair_command"]  # one node: nothing pinned, the measured path
    nodes, two, one = _losses(node_runs["nodes"]), _losses(node_runs["pair"]), _losses(node_runs["one"])
    assert sorted(nodes) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert nodes[step] == pytest.approx(two[step], rel=1e-6), step
        assert nodes[step] == pytest.approx(one[step], rel=1e-4), step
    assert (node_runs["nodes"] / "lora" / "wanforge_lora.safetensors").is_file()  # node 0's rank 0 exported it
