"""Hub publishing through the real huggingface_hub upload code, against a local stand-in for the Hub's endpoints."""

import logging

import pytest
from huggingface_hub import ModelCard

from conftest import tiny_config
from hub_server import FakeHub
from trainer.config import config_from_dict
from trainer.errors import UserError
from trainer.model_card import build_model_card
from trainer.train import train
from trainer.validation import settings_for

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


def test_failed_upload_does_not_fail_the_run(monkeypatch, clips, tmp_path):
    import huggingface_hub.constants as constants

    with FakeHub(fail_commits=True) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        cfg = tiny_config(clips, tmp_path / "run", train={"max_train_steps": 1},
                          validation={"at_end": False, "eval_every_n_steps": 0},
                          hub={"push_to_hub": True, "hub_model_id": "me/tiny-lora"})
        result = train(cfg, show_progress=False)
    import json

    status = json.loads((result.run_dir / "run.json").read_text())
    assert status["status"] == "upload_failed" and result.lora_file.is_file()
    assert len(status["hub_errors"]) == 1 and "final LoRA" in status["hub_errors"][0]
    assert "final LoRA" in status["error"] and "hf upload me/tiny-lora" in status["error"]


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
