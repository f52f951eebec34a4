"""A bare hub_model_id ("wan-disney", as SimpleTuner's quickstart writes it) is the token owner's repo: the run asks
the Hub whose token it is (real huggingface_hub client, local stand-in for the Hub) and publishes there."""

from huggingface_hub import ModelCard

from conftest import tiny_config
from hub_server import FakeHub
from trainer.train import train

TOKEN = "hf_wanforge_test_token_456"


def test_bare_repo_name_lands_in_the_token_owners_account(monkeypatch, few_clips, tmp_path):
    import huggingface_hub.constants as constants

    with FakeHub(owner="someone") as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        cfg = tiny_config(few_clips, tmp_path / "run", train={"max_train_steps": 1},
                          validation={"at_end": False, "eval_every_n_steps": 0},
                          hub={"push_to_hub": True, "hub_model_id": "wan-disney"})
        result = train(cfg, show_progress=False)
        repo = hub.write_repo("someone/wan-disney", tmp_path / "repo")
    assert [r for r, _ in hub.commits] == ["someone/wan-disney"]
    assert (repo / "wanforge_lora.safetensors").read_bytes() == result.lora_file.read_bytes()
    card = ModelCard.load(repo / "README.md")
    assert 'load_lora_weights("someone/wan-disney"' in card.text  # what another user types to load it
