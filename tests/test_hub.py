"""Hub publishing through the real huggingface_hub upload code, against a local stand-in for the Hub's endpoints."""

import json
import logging

import pytest
from huggingface_hub import ModelCard

from conftest import tiny_config
from hub_server import FakeHub
from test_webhooks import Receiver
from trainer.config.files import config_from_dict
from trainer.errors import UserError
from trainer.loop.train import train
from trainer.outputs.model_card import build_model_card
from trainer.outputs.validation_videos import settings_for

TOKEN = "hf_wanforge_test_token_123"


@pytest.fixture
def online_hub(monkeypatch):
    """The suite runs with HF_HUB_OFFLINE; point huggingface_hub at the local stand-in instead, with a token in the env."""
    import huggingface_hub.constants as constants

    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield hub


def test_training_publishes_checkpoints_lora_card_and_preview(online_hub, clips, tmp_path, caplog, capsys):
    cfg = tiny_config(clips, tmp_path / "run", train={"max_train_steps": 2}, checkpoint={"every_n_steps": 1, "total_limit": 1},
                      validation={"num_inference_steps": 2, "instance_prompt": "sks", "prompt": "a <token> square",
                                  "eval_every_n_steps": 0},
                      hub={"push_to_hub": True, "push_checkpoints_to_hub": True, "hub_model_id": "me/tiny-lora"})
    with caplog.at_level(logging.DEBUG):
        result = train(cfg, show_progress=False)
    repo = online_hub.write_repo("me/tiny-lora", tmp_path / "repo")
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        *(f"checkpoints/step-{n}/{f}" for n in (1, 2) for f in ("adapter.safetensors", "config.toml",
                                                              "rng.safetensors", "state.safetensors",
                                                              "wanforge_state.json")),
        "config.toml", "media/a-sks-square.mp4", "media/contact_sheet.png", "wanforge_lora.safetensors",
    ]
    # step-1 was pruned locally (total_limit 1) while queued: the staged copy still went up whole
    assert not (result.run_dir / "checkpoints" / "step-1").exists()
    assert (repo / "wanforge_lora.safetensors").read_bytes() == result.lora_file.read_bytes()
    assert (repo / "media" / "a-sks-square.mp4").read_bytes() == (result.run_dir / "validation" / "step-2" / "a-sks-square.mp4").read_bytes()
    card = ModelCard.load(repo / "README.md")
    assert card.data.instance_prompt == "sks" and "lora" in card.data.tags and card.data.pipeline_tag == "text-to-video"
    assert card.data.widget == [{"text": "a sks square", "output": {"url": "media/a-sks-square.mp4"}}]
    assert '<video src="media/a-sks-square.mp4"' in card.text and "![frames of the validation videos](media/contact_sheet.png)" in card.text
    assert "`sks`" in card.text and "| LoRA rank / alpha | 16 / 16 |" in card.text
    # the real client talked to the endpoint with the token from the environment; wanforge never printed it
    commits = [message for repo_id, message in online_hub.commits]
    assert commits == ["checkpoint at step 1", "checkpoint at step 2", "LoRA after 2 steps (wanforge)"]
    auth = {headers.get("Authorization") or headers.get("authorization") for method, path, headers in online_hub.requests
            if method == "POST" and "validate-yaml" not in path}  # create, preupload, commit
    assert len(online_hub.requests) >= 7
    assert auth == {f"Bearer {TOKEN}"}
    out = capsys.readouterr()
    assert TOKEN not in caplog.text and TOKEN not in out.out + out.err
    assert not (result.run_dir / ".hub-staging").exists() or not any((result.run_dir / ".hub-staging").rglob("*.safetensors"))


@pytest.fixture
def hub_factory(monkeypatch):
    """A local Hub in a given failure mode, with huggingface_hub pointed at it (uploads and downloads) and no waits
    between retries."""
    import huggingface_hub.constants as constants

    servers = []

    def start(**mode) -> FakeHub:
        hub = FakeHub(**mode).__enter__()
        servers.append(hub)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("WANFORGE_UPLOAD_BACKOFF_S", "0.01")
        monkeypatch.setenv("WANFORGE_UPLOAD_ATTEMPTS", "3")
        return hub

    yield start
    for hub in servers:
        hub.__exit__()


@pytest.mark.parametrize("mode", [{"fail_commits": True}, {"drop_files": True}])
def test_final_upload_that_fails_or_does_not_verify_is_upload_failed(hub_factory, clips, tmp_path, mode):
    """A refused commit, or one the Hub accepts but does not list back: retried, then run.json says upload_failed
    with the error and the remedy; the LoRA is still in the run folder."""
    hub = hub_factory(**mode)
    receiver = Receiver()
    hook = tmp_path / "hook.json"
    hook.write_text(json.dumps({"url": receiver.url, "format": "raw"}))
    cfg = tiny_config(clips, tmp_path / "run", train={"max_train_steps": 1},
                      validation={"at_end": False, "eval_every_n_steps": 0},
                      tracking={"webhook_config": str(hook)},
                      hub={"push_to_hub": True, "hub_model_id": "me/tiny-lora"})
    try:
        result = train(cfg, show_progress=False)
    finally:
        receiver.close()
    status = json.loads((result.run_dir / "run.json").read_text())
    assert status["status"] == "upload_failed" and result.lora_file.is_file()
    assert "final LoRA" in status["error"] and ("does not list" in status["error"]) == ("drop_files" in mode)
    assert "hf upload me/tiny-lora" in status["remedy"] and str(result.run_dir) in status["remedy"]
    commits = hub.refused if "fail_commits" in mode else len([c for c in hub.commits if "LoRA after" in c[1]])
    assert commits == 3  # WANFORGE_UPLOAD_ATTEMPTS
    errors = [b["message"] for b in receiver.json_bodies() if b.get("level") == "error"]
    assert any("Hub upload of final LoRA" in e for e in errors)


def test_a_flaky_hub_is_retried_until_the_upload_verifies(hub_factory, clips, tmp_path):
    hub = hub_factory(fail_first=2)
    cfg = tiny_config(clips, tmp_path / "run", train={"max_train_steps": 1},
                      validation={"at_end": False, "eval_every_n_steps": 0},
                      hub={"push_to_hub": True, "hub_model_id": "me/tiny-lora"})
    result = train(cfg, show_progress=False)
    status = json.loads((result.run_dir / "run.json").read_text())
    assert status["status"] == "completed" and status["hub_errors"] == [] and hub.refused == 2
    assert hub.files["me/tiny-lora"]["wanforge_lora.safetensors"] == result.lora_file.read_bytes()


def test_upload_failures_reach_the_tracker():
    """tracker_note: a W&B alert and a TensorBoard text, and a tracker that itself fails does not raise."""
    from trainer.outputs.hub import tracker_note

    seen = []

    class Wandb:
        name = "wandb"
        run = type("Run", (), {"alert": staticmethod(lambda title, text: seen.append(("wandb", title, text)))})()

    class Board:
        name = "tensorboard"
        writer = type("W", (), {"add_text": staticmethod(lambda tag, text: seen.append(("tb", tag, text)))})()

    class Broken:
        name = "wandb"

    tracker_note([Wandb(), Board(), Broken()])("Hub upload of checkpoint step 3 to me/x failed: HTTPError: 500")
    assert [s[0] for s in seen] == ["wandb", "tb"] and all("step 3" in s[2] for s in seen)


def test_with_retries_backs_off_exponentially():
    from trainer.outputs.hub import with_retries

    waits, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionError("reset")
        return "ok"

    assert with_retries("x", flaky, attempts=5, first_wait_s=2, sleep=waits.append) == "ok"
    assert waits == [2, 4, 8]
    with pytest.raises(ConnectionError):
        with_retries("x", lambda: (_ for _ in ()).throw(ConnectionError("down")), attempts=2, first_wait_s=1,
                     sleep=waits.append)


# ---------------------------------------------------------------- the node's run-folder upload (launcher/node.py)


def _node_env(monkeypatch, tmp_path, output="hf://me/runs", name="r1", keep_alive="0.001"):
    monkeypatch.setenv("WANFORGE_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("WANFORGE_RUNS_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("OUTPUT_MODE", "upload")
    monkeypatch.setenv("OUTPUT", output)
    monkeypatch.setenv("RUN_NAME", name)
    monkeypatch.setenv("KEEP_ALIVE_MIN", keep_alive)
    monkeypatch.setenv("UPLOAD_EVERY_MIN", "60")


def _fake_training(monkeypatch, tmp_path):
    """The node's training command replaced by a process that writes a finished run folder (the trainer is tested
    elsewhere; here the node's upload, status and exit code are under test)."""
    import sys

    from launcher import node

    (tmp_path / "root").mkdir(parents=True, exist_ok=True)
    (tmp_path / "root" / "config.toml").write_text("")
    script = ("import json, pathlib, sys; r = pathlib.Path(sys.argv[1]); (r / 'lora').mkdir(parents=True); "
              "(r / 'lora' / 'w.safetensors').write_bytes(b'w' * 4096); (r / 'config.toml').write_text('x = 1'); "
              "(r / 'run.json').write_text(json.dumps({'status': 'completed', 'step': 2}))")
    monkeypatch.setattr(node, "train_command", lambda config: [sys.executable, "-c", script, str(node.run_dir())])


@pytest.mark.parametrize("mode", [{"fail_commits": True}, {"drop_files": True}])
def test_node_keeps_the_run_when_the_final_upload_fails(hub_factory, monkeypatch, tmp_path, capsys, mode):
    """The node's final upload is retried and verified; when it fails the run exits 3, run.json says upload_failed
    with the remedy, the node stays up KEEP_ALIVE_MIN, and `wanforge status` shows it."""
    from launcher import lifecycle, node
    from launcher.cli import main
    from launcher.lifecycle import LaunchRecord

    hub_factory(**mode)
    _node_env(monkeypatch, tmp_path)
    _fake_training(monkeypatch, tmp_path)
    slept = []
    monkeypatch.setattr(node.time, "sleep", slept.append)
    assert node.main(["run"]) == node.UPLOAD_FAILED_EXIT
    status = json.loads((tmp_path / "outputs" / "r1" / "run.json").read_text())
    assert status["status"] == "upload_failed" and "failed (final)" in status["error"]
    assert "wanforge sync r1 --from-node" in status["remedy"]
    assert slept == [pytest.approx(0.06)]
    out = capsys.readouterr().out
    assert "KEEP_ALIVE_MIN" in out and "upload_failed" in out

    monkeypatch.setenv("WANFORGE_STATE_DIR", str(tmp_path / "state"))
    lifecycle.save_record(LaunchRecord(name="r1", target="local", managed=False, output="hf://me/runs",
                                       output_mode="upload", remote="", local_dir=str(tmp_path / "outputs" / "r1")))
    assert main(["status", "r1"]) == 0
    assert "run: upload failed: upload of" in capsys.readouterr().out


def test_node_uploads_verifies_and_sync_brings_back_the_same_folder(hub_factory, monkeypatch, tmp_path, capsys):
    from launcher import lifecycle, node
    from launcher.lifecycle import LaunchRecord
    from launcher.sync import sync_run

    hub = hub_factory()
    _node_env(monkeypatch, tmp_path, name="r 2")  # a --target local run keeps its folder name: spaces work
    _fake_training(monkeypatch, tmp_path)
    assert node.main(["run"]) == 0
    assert "(final, verified): 3 files" in capsys.readouterr().out
    folder = tmp_path / "outputs" / "r 2"
    assert hub.files["me/runs"]["r 2/lora/w.safetensors"] == (folder / "lora" / "w.safetensors").read_bytes()

    monkeypatch.setenv("WANFORGE_STATE_DIR", str(tmp_path / "state"))
    rec = LaunchRecord(name="r2", target="runpod", managed=False, output="hf://me/runs", output_mode="upload",
                       remote="r2:/outputs/r2", local_dir=str(tmp_path / "laptop run"))
    hub.files["me/runs"] = {k.replace("r 2/", "r2/"): v for k, v in hub.files["me/runs"].items()}
    lifecycle.save_record(rec)
    back, status = sync_run(rec)
    assert status == "completed"
    for path in folder.rglob("*"):
        if path.is_file():
            assert (back / path.relative_to(folder)).read_bytes() == path.read_bytes()


def test_node_periodic_upload_failures_reach_the_log_and_the_webhook(hub_factory, monkeypatch, tmp_path, clips, capsys):
    """While training runs, a refused periodic upload is a log line and a webhook error; the next one tries again."""
    import time

    from launcher import node
    from trainer.config.files import save_config

    hub = hub_factory(fail_commits=True)
    _node_env(monkeypatch, tmp_path)
    receiver = Receiver()
    hook = tmp_path / "hook.json"
    hook.write_text(json.dumps({"url": receiver.url, "format": "raw"}))
    node.root().mkdir(parents=True)
    save_config(tiny_config(clips, tmp_path / "run", tracking={"webhook_config": str(hook)}), node.node_config())
    folder = tmp_path / "outputs" / "r1"
    (folder / "lora").mkdir(parents=True)
    (folder / "lora" / "w.safetensors").write_bytes(b"w" * 64)
    monkeypatch.setenv("WANFORGE_UPLOAD_ATTEMPTS", "1")
    try:
        with node.Uploader(folder, "hf://me/runs", "r1", every_s=0.05) as uploader:
            deadline = time.time() + 20
            while hub.refused < 2 and time.time() < deadline:
                time.sleep(0.05)
        time.sleep(0.5)  # the webhook thread posts in the background
    finally:
        receiver.close()
    out = capsys.readouterr().out
    assert out.count("failed (periodic)") >= 2 and "failed (final)" in out and uploader.final_error is not None
    errors = [b["message"] for b in receiver.json_bodies() if b.get("level") == "error"]
    assert any("failed (periodic)" in e for e in errors) and any("failed (final)" in e for e in errors)


def test_node_exits_non_zero_when_the_trainers_own_push_failed(monkeypatch, tmp_path):
    """Outputs kept on the node (or a mounted bucket), push_to_hub on: a final push that did not verify (run.json
    upload_failed, written by the trainer) makes the node's run fail too, so SkyPilot reports it."""
    import sys

    from launcher import node

    _node_env(monkeypatch, tmp_path)
    monkeypatch.setenv("OUTPUT_MODE", "node")
    monkeypatch.delenv("OUTPUT")
    _fake_training(monkeypatch, tmp_path)
    script = node.train_command(None)[2].replace("'completed'", "'upload_failed'")
    monkeypatch.setattr(node, "train_command", lambda config: [sys.executable, "-c", script, str(node.run_dir())])
    assert node.main(["run"]) == node.UPLOAD_FAILED_EXIT


@pytest.mark.parametrize("mode", ["deny_reads", "closed_port"])
def test_unreachable_output_at_start_is_one_line(hub_factory, monkeypatch, tmp_path, capsys, mode):
    """The node's resume check cannot read OUTPUT (a token that cannot see it, no Hub at all): one line, exit 2."""
    import huggingface_hub.constants as constants

    from launcher import node

    hub_factory(deny_reads=True)
    if mode == "closed_port":
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    _node_env(monkeypatch, tmp_path)
    _fake_training(monkeypatch, tmp_path)
    assert node.main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: OUTPUT=hf://me/runs: cannot read r1/ there") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "outputs" / "r1" / "run.json").exists()  # nothing trained


def test_no_token_is_a_user_error_before_training(monkeypatch, clips, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    cfg = tiny_config(clips, tmp_path / "run", hub={"push_to_hub": True, "hub_model_id": "me/x"})
    with pytest.raises(UserError, match="HF_TOKEN"):
        train(cfg, show_progress=False)


def test_model_card_for_a_hub_base_model(tmp_path):
    cfg = config_from_dict({"datasets": [{"path": str(tmp_path)}], "lora": {"rank": 32},
                            "validation": {"instance_prompt": "ohwx", "prompt": "<token> dancing"},
                            "ema": {"use_ema": True}, "hub": {"hub_model_id": "me/dance", "trigger_words": ["ohwx", "dance"]}})
    settings = settings_for(cfg, None)
    text = build_model_card(cfg, settings, "wanforge_lora.safetensors", 2000, [("media/ohwx-dancing.mp4", "ohwx dancing")],
                            "media/contact_sheet.png", "ema/wanforge_lora.safetensors")
    card = ModelCard(text)
    assert card.data.base_model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert card.data.instance_prompt == "ohwx, dance" and card.data.library_name == "diffusers"
    assert 'pipe.load_lora_weights("me/dance", weight_name="wanforge_lora.safetensors")' in text
    assert "unipc, shift 5, 40 steps, guidance 5" in text and "832x480, 81 frames at 16 fps" in text
    assert "ema/wanforge_lora.safetensors" in text and "| EMA | decay 0.999 |" in text
    with pytest.raises(UserError, match="hub_model_id"):
        config_from_dict({"datasets": [{"path": "x"}], "hub": {"push_checkpoints_to_hub": True}})


def test_bare_repo_name_lands_in_the_token_owners_account(online_hub, few_clips, tmp_path):
    """A bare hub_model_id ("wan-disney", as SimpleTuner's quickstart writes it) is the token owner's repo: the run
    asks the Hub whose token it is and publishes there; the card names the full repo."""
    cfg = tiny_config(few_clips, tmp_path / "run", train={"max_train_steps": 1},
                      validation={"at_end": False, "eval_every_n_steps": 0},
                      hub={"push_to_hub": True, "hub_model_id": "wan-disney"})
    result = train(cfg, show_progress=False)
    repo = online_hub.write_repo("user/wan-disney", tmp_path / "repo")
    assert [r for r, _ in online_hub.commits] == ["user/wan-disney"]
    assert (repo / "wanforge_lora.safetensors").read_bytes() == result.lora_file.read_bytes()
    assert 'load_lora_weights("user/wan-disney"' in ModelCard.load(repo / "README.md").text
