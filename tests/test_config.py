import subprocess
import sys

import pytest

from trainer.config.files import apply_override, config_from_dict, load_config, save_config
from trainer.errors import UserError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_toml_with_overrides_and_relative_paths(tmp_path):
    cfg_file = write(tmp_path / "run.toml", '[[datasets]]\npath = "clips"\nnum_frames = 33\n\n[train]\nmax_train_steps = 10\n')
    cfg = load_config(cfg_file, ["train.max_train_steps=25", "optim.learning_rate=2e-4", "datasets.0.repeats=3",
                                 "train.max_grad_norm=none", "lora.target_modules=['attn1.to_q']"])
    assert cfg.train.max_train_steps == 25
    assert cfg.optim.learning_rate == 2e-4
    assert cfg.datasets[0].repeats == 3 and cfg.datasets[0].num_frames == 33
    assert cfg.train.max_grad_norm is None
    assert cfg.lora.target_modules == ["attn1.to_q"]
    assert cfg.datasets[0].path == (tmp_path / "clips").resolve()  # relative to the file, not the cwd
    assert cfg.dataset_shape(0) == (33, 480, 832)  # flavour defaults fill the rest


def test_save_and_reload_round_trip(tmp_path):
    cfg = config_from_dict({"datasets": [{"path": str(tmp_path)}], "train": {"max_grad_norm": None, "output_dir": str(tmp_path / "run")},
                            "lora": {"alpha": 8.0}})
    save_config(cfg, tmp_path / "c.toml")
    again = load_config(tmp_path / "c.toml")
    assert again == cfg
    assert again.train.max_grad_norm is None  # an explicit "off" survives TOML, which has no null


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"train": {"learning_rat": 1}}, 'train.learning_rat: it belongs in [optim] as learning_rate'),
        ({"train": {"max_train_stpes": 1}}, 'unknown key train.max_train_stpes: did you mean "max_train_steps"?'),
        ({"datasets": [{"path": "x", "frame_interval": 6}]}, "datasets[0].frame_interval: must be a multiple of 4"),
        ({"datasets": [{"path": "x", "width": 830}]}, "datasets[0].width: must be a positive multiple of 16"),
        ({"model": {"flavour": "t2v-480p-1.3b"}}, 'did you mean "t2v-480p-1.3b-2.1"?'),
        ({"optim": {"learning_rate": -1}}, "optim.learning_rate: Input should be greater than 0"),
        ({}, "no dataset: add a [[datasets]] table"),
    ],
)
def test_errors_name_the_field_and_the_fix(data, expected):
    data.setdefault("datasets", [{"path": "x"}])
    if data == {"datasets": [{"path": "x"}]} and expected.startswith("no dataset"):
        data = {}
    with pytest.raises(UserError) as err:
        config_from_dict(data)
    assert expected in str(err.value)


def test_bad_override_syntax():
    with pytest.raises(UserError, match="expected section.key=value"):
        apply_override({}, "train.max_train_steps")


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    cfg_file = write(tmp_path / "bad.toml", '[[datasets]]\npath = "clips"\n[lora]\nrnak = 4\n')
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "check", str(cfg_file)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert 'unknown key lora.rnak: did you mean "rank"?' in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_dataset_folder_exits_2(tmp_path):
    cfg_file = write(tmp_path / "c.toml", '[[datasets]]\npath = "nowhere"\n')
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "check", str(cfg_file)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "datasets[0].path" in proc.stderr and "is not a folder" in proc.stderr


def test_config_needs_no_torch():
    """The notebook and launcher validate configs where torch may not be installed."""
    code = "import sys, trainer.config, launcher.cli; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"
