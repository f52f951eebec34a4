"""The notebook config form: widgets from the schema, live checks, scan, estimate, TOML, progress panel, Colab helpers."""

from __future__ import annotations

import html
import json
import shutil
import sys
from pathlib import Path

import ipywidgets as w
import pytest
from conftest import tiny_config

from launcher.form.config_form import ConfigForm
from trainer.config.files import load_config, save_config


@pytest.fixture
def form(clips, tmp_path) -> ConfigForm:
    return ConfigForm(tiny_config(clips, tmp_path / "run"))


def test_widgets_follow_the_schema(form):
    kinds = {key: form.fields[key] for key in ("train.max_train_steps", "optim.learning_rate", "memory.compile",
                                               "lora.save_format", "model.flavour", "datasets.0.width",
                                               "lora.target_modules", "validation.skip_layers", "tread.routes")}
    assert isinstance(kinds["train.max_train_steps"].widget, w.IntText)
    assert isinstance(kinds["optim.learning_rate"].widget, w.FloatText)
    assert isinstance(kinds["memory.compile"].widget, w.Checkbox)
    assert isinstance(kinds["lora.save_format"].widget, w.Dropdown)
    assert set(kinds["lora.save_format"].widget.options) == {"comfyui", "diffusers"}
    assert "t2v-480p-1.3b-2.1" in kinds["model.flavour"].widget.options
    assert isinstance(kinds["datasets.0.width"].widget, w.Text)  # optional: empty means the default
    assert isinstance(kinds["lora.target_modules"].widget, w.TagsInput)
    assert isinstance(kinds["validation.skip_layers"].widget, w.IntsInput)
    assert isinstance(kinds["tread.routes"].widget, w.Textarea)
    assert "Optimizer steps" in form.fields["train.max_train_steps"].widget.tooltip
    assert "Optimizer steps" in form.fields["train.max_train_steps"].row.children[0].value  # label's help
    # sections: the essentials open, the advanced ones collapsed
    groups = {g._dom_classes[0]: g for g in form.widget.children if isinstance(g, w.Accordion)}
    assert groups["wf-section-lora"].selected_index == 0
    assert groups["wf-section-memory"].selected_index is None
    assert groups["wf-section-crepa"].selected_index is None


def test_changing_fields_changes_the_config(form):
    assert form.config is not None and not form.launch_button.disabled
    form.set("train.max_train_steps", 7)
    form.set("lora.save_format", "diffusers")
    form.set("memory.compile", True)
    form.set("datasets.0.width", "32")
    form.set("lora.target_modules", ["attn1.to_q", "attn1.to_v"])
    form.set("validation.skip_layers", [1])
    form.set("tread.routes", '[{"selection_ratio": 0.25, "start_layer_idx": 0, "end_layer_idx": 1}]')
    cfg = form.config
    assert cfg.train.max_train_steps == 7 and cfg.lora.save_format == "diffusers" and cfg.memory.compile
    assert cfg.datasets[0].width == 32 and cfg.lora.target_modules == ["attn1.to_q", "attn1.to_v"]
    assert cfg.validation.skip_layers == [1] and cfg.tread.routes[0].selection_ratio == 0.25
    form.set("train.max_grad_norm", "")  # an optional field emptied: off
    assert form.config.train.max_grad_norm is None
    assert "7 steps" in form.status.value


def test_invalid_value_shows_its_message_and_disables_launch(form):
    form.set("datasets.0.width", "100")
    assert form.config is None and form.launch_button.disabled
    message = form.fields["datasets.0.width"].message.value
    assert "multiple of 16" in message and "try 96 or 112" in message
    assert "1 problem(s)" in form.status.value
    form.set("lora.rank", 0)
    assert "greater than or equal to 1" in form.fields["lora.rank"].message.value
    form.set("datasets.0.width", "64")
    form.set("lora.rank", 4)
    assert form.config is not None and not form.launch_button.disabled
    assert form.fields["datasets.0.width"].message.value == ""
    # a rule across fields shows at its section; unparsable JSON beside its field
    form.set("train.max_grad_value", "0.5")
    assert "either max_grad_norm or max_grad_value" in form.section_messages["train"].value
    form.set("train.max_grad_value", "")
    form.set("tread.routes", "[{")
    assert "not valid JSON" in form.fields["tread.routes"].message.value and form.launch_button.disabled
    form.set("tread.routes", '[{"selection_ratio": 2, "start_layer_idx": 0, "end_layer_idx": 1}]')
    assert "[0].selection_ratio: Input should be less than 1" in form.fields["tread.routes"].message.value
    form.set("tread.routes", "")
    assert form.config is not None


def test_datasets_add_and_remove(form, clips):
    form.add_dataset()
    assert form.config is None and "Field required" in form.fields["datasets.1.path"].message.value
    form.set("datasets.1.path", str(clips))
    form.set("datasets.1.repeats", 3)
    assert [d.repeats for d in form.config.datasets] == [1, 3]
    form.remove_dataset(0)
    assert len(form.config.datasets) == 1 and form.config.datasets[0].repeats == 3
    form.remove_dataset(0)
    assert form.config is None and "no dataset" in form.section_messages[""].value


def test_toml_round_trip_and_a_file_with_mistakes(form, tmp_path):
    form.set("lora.rank", 12)
    saved = form.save_toml(tmp_path / "a.toml")
    assert load_config(saved).lora.rank == 12
    again = ConfigForm.from_file(saved)
    assert again.config == form.config
    bad = tmp_path / "bad.toml"
    bad.write_text(saved.read_text().replace("rank = 12", "rank = 0").replace("[lora]", "[lora]\nrnak = 3"))
    loaded = ConfigForm.from_file(bad)
    assert loaded.config is None and "greater than or equal to 1" in loaded.fields["lora.rank"].message.value
    assert 'unknown key lora.rnak: did you mean "rank"?' in html.unescape(loaded.file_panel.message.value)
    with pytest.raises(Exception, match="not saved"):
        loaded.save_toml(tmp_path / "c.toml")


def test_relative_dataset_path_is_relative_to_the_loaded_file(clips, tmp_path):
    shutil.copytree(clips, tmp_path / "clips")
    cfg = tiny_config(tmp_path / "clips", tmp_path / "run")
    save_config(cfg, tmp_path / "c.toml")
    text = (tmp_path / "c.toml").read_text().replace(str(tmp_path / "clips"), "clips")
    (tmp_path / "c.toml").write_text(text)
    form = ConfigForm.from_file(tmp_path / "c.toml")
    assert form.config.datasets[0].path == (tmp_path / "clips").resolve()


def test_scan_summary_counts_clips_buckets_and_problems(dataset_copy, tmp_path):
    (dataset_copy / "broken.mp4").write_bytes(b"not a video")
    (dataset_copy / "broken.txt").write_text("a caption")
    shutil.copy(dataset_copy / "clip_00.mp4", dataset_copy / "uncaptioned.mp4")
    form = ConfigForm(tiny_config(dataset_copy, tmp_path / "run"))
    summary = form.scan_panel.scan()
    assert summary.clips == 8 and summary.buckets == {0: {"64x64@9": 8}}
    problems = {Path(p).name for p, _ in summary.problems}
    assert problems == {"broken.mp4", "uncaptioned.mp4"}
    shown = form.scan_panel.output.value
    assert "8 usable clip(s)" in shown and "2 skipped file(s)" in shown and "64x64@9" in shown and "broken.mp4" in shown
    assert form.check() == []
    form.set("train.train_batch_size", 16)  # one bucket of 8 clips gives no whole batch: training could not step
    assert any("raise datasets.repeats" in p for p in form.check())
    form.set("datasets.0.path", str(tmp_path / "nowhere"))
    assert "is not a folder" in " ".join(form.check())


def test_estimate_panel_follows_the_config_and_the_gpu(form):
    from launcher.estimate import estimate

    form.set("model.flavour", "t2v-480p-1.3b-2.1")
    for key, value in (("width", "832"), ("height", "480"), ("num_frames", "81")):
        form.set(f"datasets.0.{key}", value)
    first = form.estimate_panel.last
    assert first is not None and first.gpu == "H100" and first.total_hours > 0
    assert f"{first.vram_gib:.1f} GiB" in form.estimate_panel.output.value
    form.set("train.max_train_steps", form.config.train.max_train_steps * 4)
    assert form.estimate_panel.last.total_hours > first.total_hours
    form.estimate_panel.gpu.value = "L4"
    form.estimate_panel.count.value = 2
    assert form.estimate_panel.last == estimate(form.config, "L4:2")
    form.set("lora.rank", 0)
    assert form.estimate_panel.last is None and "fix the config" in form.estimate_panel.output.value


def test_estimate_of_the_tiny_model_says_cpu_trial(form):
    from launcher.estimate_table import estimate_text

    assert form.config.model.flavour == "tiny" and not form.check()
    assert form.estimate_panel.last is None
    shown = form.estimate_panel.output.value
    text = estimate_text(form.config, "H100", others=4)
    for said in (shown, text):
        assert "CPU trial" in said and "GiB" not in said and "0.00" not in said


def test_estimate_columns_line_up(form):
    from launcher.estimate import estimate
    from launcher.estimate_table import ESTIMATE_HEADER, TEXT_COLUMNS, estimate_table, estimate_text

    form.set("model.flavour", "t2v-480p-14b-2.1")
    for key, value in (("width", "832"), ("height", "480"), ("num_frames", "81")):
        form.set(f"datasets.0.{key}", value)
    rows = [estimate(form.config, gpu) for gpu in ("B200:2", "L4")]
    assert rows[0].fits and not rows[1].fits  # both kinds of row
    lines = estimate_table(rows)
    header = lines[0]
    for title in (t for i, t in enumerate(ESTIMATE_HEADER) if i not in TEXT_COLUMNS):  # numbers: right-aligned
        end = header.index(title) + len(title)
        for line in lines[1:]:
            assert line[end - 1] != " " and (end == len(line) or line[end] == " "), (title, line)
    assert lines[1].startswith("2x B200 ") and lines[2].rsplit("  ", 1)[0].rstrip().endswith("DOES NOT FIT")
    assert lines[1].index(rows[0].fit_label) == header.index("fits")  # the verdict under its title
    text = estimate_text(form.config, "H100", others=3).splitlines()
    assert text[0].split() == header.split() and text[2] == "" and text[6].startswith("training steps only")
    cited = [line.split(":")[0].strip() for line in text[7:-1]]  # "row N" of every row a figure cites, in order
    refs = {n for line in text[1:6] if line for n in line.split()[-2:]}  # the last column: "N, M"
    assert cited and {c.removeprefix("row ") for c in cited} == {r.strip(",") for r in refs}
    assert text[-1].startswith("H100: memory preset")


def test_form_module_imports_no_torch():
    import subprocess

    code = "import sys, launcher.form, launcher.progress, launcher.colab; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False"


def test_launch_button(form, tmp_path, monkeypatch):
    """Invalid: nothing starts. Valid: `wanforge launch` starts in the background and the panel under the button
    follows it; here the request is impossible (RunPod without --output), so the panel shows the launcher's reason.
    (The walkthrough notebook test runs a real local launch to the end.)"""
    monkeypatch.setenv("WANFORGE_STATE_DIR", str(tmp_path / "launches"))
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # the launch subprocess imports the checkout
    form.set("lora.rank", 0)
    form.launch_button.click()
    assert form.launch_panel.handle is None and "not launched" in form.launch_panel.message.value
    form.set("lora.rank", 4)
    form.launch_panel.target.value = "runpod"
    form.estimate_panel.gpu.value = "H100"
    form.launch_button.click()
    handle, panel = form.launch_panel.handle, form.launch_panel.panel
    assert handle is not None and "launched" in form.launch_panel.message.value
    assert handle.wait(timeout=120) == 2
    panel._thread.join(timeout=30)
    assert not panel._thread.is_alive() and "launch exited 2" in panel.status.value
    assert "--output hf://USER/REPO" in panel.log.value and "--gpu H100:1" in handle.log_tail()


def test_progress_reads_a_run_folder_as_it_grows(tmp_path):
    from launcher.progress import ProgressPanel, read_progress

    run = tmp_path / "run"
    assert read_progress(run).status == "waiting"
    (run / "validation" / "step-2").mkdir(parents=True)
    (run / "validation" / "step-10").mkdir(parents=True)
    (run / "validation" / "step-2" / "a.mp4").write_bytes(b"old")
    (run / "validation" / "step-10" / "a.mp4").write_bytes(b"new")
    (run / "run.json").write_text(json.dumps({"status": "training", "step": 3, "max_train_steps": 10}))
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "s_per_step": 2.0}) for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')  # the last line half-written
    p = read_progress(run)
    assert (p.status, p.step, p.total, len(p.losses)) == ("training", 3, 10, 3)
    assert p.eta_s == pytest.approx(14.0) and p.latest_video == run / "validation" / "step-10" / "a.mp4"
    assert p.line() == "training: step 3/10, loss 0.3333, 2.00 s/step, ETA 0m14s"
    panel = ProgressPanel(run)
    panel.refresh()
    assert "<polyline" in panel.status.value and "step-10/a.mp4" in panel.video.value


def test_colab_helpers_outside_colab(tmp_path):
    from launcher import colab

    env = colab.detect()
    assert not env.in_colab and "not Colab" in env.describe()
    t4 = colab.GpuInfo("Tesla T4", (7, 5), 14.7)
    a100 = colab.GpuInfo("NVIDIA A100-SXM4-40GB", (8, 0), 39.4)
    assert (t4.kind, t4.bf16, a100.kind, a100.bf16) == ("T4", False, "A100", True)
    assert colab.gpu_preset(t4)["train"]["mixed_precision"] == "fp16"
    assert colab.gpu_preset(t4)["model"]["base_dtype"] == "float16"
    assert colab.gpu_preset(a100)["train"]["mixed_precision"] == "bf16"
    gpu_env = colab.Environment(True, colab.GpuInfo("NVIDIA L4", (8, 9), 22.5))
    from trainer.config.files import config_from_dict

    cfg = config_from_dict(colab.quick_trial_config(gpu_env, "", tmp_path))  # the presets are valid configs
    assert cfg.model.flavour == "t2v-480p-1.3b-2.1" and cfg.dataset_shape() == (33, 480, 832)
    from launcher.form.panels import scan_config

    assert scan_config(cfg).clips == 8  # the generated demo clips are long enough for the preset's frames
    # pinned installs: only what differs from the constraints is planned
    from importlib.metadata import version

    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"pydantic=={version('pydantic')}\ntomli-w==0.0.1\n"
                           "# torch is installed first and separately: 2.13.0 (CPU build)\n")
    planned = colab.planned_installs(constraints)
    assert "tomli-w==0.0.1" in planned and not any(p.startswith("pydantic") for p in planned)
    assert not any(p.startswith("torch") for p in planned)
    assert colab.tested_torch(constraints) == "2.13.0"


def test_remote_run_is_followed_through_sync(clips, tmp_path, monkeypatch, rsync):
    """A remote run is watched through `wanforge sync` (real rsync): here the node's run folder is a local folder."""
    from launcher.form.launch import RunHandle
    from launcher.lifecycle import LaunchRecord, save_record
    from launcher.progress import ProgressPanel

    monkeypatch.setenv("WANFORGE_STATE_DIR", str(tmp_path / "launches"))
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    node = tmp_path / "node" / "wf-remote"
    (node / "validation" / "step-3").mkdir(parents=True)
    shutil.copy(clips / "clip_00.mp4", node / "validation" / "step-3" / "prompt.mp4")
    (node / "config.toml").write_text("")
    (node / "run.json").write_text(json.dumps({"status": "completed", "step": 3, "max_train_steps": 3}))
    (node / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5, "s_per_step": 1.0}) + "\n"
                                                for s in (1, 2, 3)))
    local = tmp_path / "local"
    save_record(LaunchRecord(name="wf-remote", target="aws", managed=False, output=None, output_mode="node",
                             remote=str(node), local_dir=str(local)))
    handle = RunHandle("wf-remote", "aws", local, tmp_path / "launch.log")
    panel = ProgressPanel(local, handle)
    assert panel.progress.status == "waiting"
    progress = panel.watch(interval_s=0.1, timeout_s=120, display_panel=False)
    assert progress.status == "completed" and progress.step == 3 and len(progress.losses) == 3
    assert (local / "validation" / "step-3" / "prompt.mp4").is_file() and "synced" in panel.status.value
    assert "step-3/prompt.mp4" in panel.video.value


def test_notebook_starting_configs(tmp_path):
    from launcher.form.start import starting_config

    data = starting_config("", tmp_path, tiny=True, steps=5)  # generated clips, the tiny CPU model
    form = ConfigForm(data)
    assert form.config is not None and form.config.train.max_train_steps == 5
    assert form.fields["datasets.0.resolution"].widget.value == ""  # TOML's "none" shows as an empty field
    assert len(form.scan_panel.scan().clips_per_dataset) == 1 and form.scan_panel.summary.clips == 8
    hub = ConfigForm(starting_config("someone/clips", tmp_path, tiny=False))
    assert hub.config.datasets[0].hf_repo == "someone/clips" and hub.config.model.flavour == "t2v-480p-1.3b-2.1"
    assert hub.config.datasets[0].path == (tmp_path / "data" / "clips").resolve()


def test_import_a_simpletuner_config(clips, tmp_path, monkeypatch):
    root = tmp_path / "SimpleTuner"
    (root / "config").mkdir(parents=True)
    shutil.copytree(clips, root / "datasets" / "shapes")
    (root / "config" / "config.json").write_text(json.dumps({
        "model_family": "wan", "model_type": "lora", "model_flavour": "t2v-480p-1.3b-2.1", "lora_rank": 8,
        "max_train_steps": 1234, "output_dir": "output/wan", "learning_rate": 5e-5,
        "data_backend_config": "config/multidatabackend.json"}))
    (root / "config" / "multidatabackend.json").write_text(json.dumps([
        {"id": "shapes", "type": "local", "dataset_type": "video", "instance_data_dir": "datasets/shapes",
         "caption_strategy": "textfile", "resolution": 480, "resolution_type": "pixel_area",
         "video": {"num_frames": 33}},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": "cache/text/wan"}]))
    form = ConfigForm()
    assert form.config is None  # an empty form: no dataset yet
    out = form.import_simpletuner(root / "config" / "config.json", out=tmp_path / "imported.toml", root=root)
    cfg = form.config
    assert out.is_file() and cfg is not None
    assert (cfg.lora.rank, cfg.train.max_train_steps, cfg.optim.learning_rate) == (8, 1234, 5e-5)
    assert cfg.datasets[0].path == (root / "datasets" / "shapes").resolve() and cfg.datasets[0].num_frames == 33
    assert form.fields["lora.rank"].widget.value == 8 and "imported" in form.file_panel.message.value
    with pytest.raises(Exception, match="no such config.json"):
        form.import_simpletuner(tmp_path / "missing.json", out=tmp_path / "x.toml")
