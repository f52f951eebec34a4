"""`wanforge estimate`: the measured rows come back exactly at their own shape, and the scaling rules hold."""

from __future__ import annotations

import pytest

from launcher import estimate as est_mod
from launcher.cli import main
from launcher.estimate import cheapest_fitting, estimate, estimate_all, known_gpus, parse_gpu
from trainer.config.files import config_from_dict, load_config, save_config
from trainer.errors import UserError


def cfg_for(flavour="t2v-480p-1.3b-2.1", frames=81, width=832, height=480, rank=16, gc=True, batch=1, steps=1000,
            accum=1):
    return config_from_dict({
        "model": {"flavour": flavour},
        "datasets": [{"path": "/nonexistent", "num_frames": frames, "width": width, "height": height}],
        "lora": {"rank": rank},
        "train": {"max_train_steps": steps, "train_batch_size": batch, "gradient_accumulation_steps": accum},
        "memory": {"gradient_checkpointing": gc},
    })


def test_measured_h100_row_is_reproduced_at_its_own_shape():
    e = estimate(cfg_for(), "H100")
    assert e.s_per_step == pytest.approx(2.369, rel=1e-6)
    assert e.vram_gib == pytest.approx(11.70, abs=0.02)  # LoRA-size term is the only modelled part at this shape
    assert e.fits and "bench/RESULTS.md" in e.basis
    assert e.total_hours == pytest.approx(2.369 * 1000 / 3600, rel=1e-3)
    assert e.cost_usd == pytest.approx(e.total_hours * known_gpus()["H100"].usd_per_hour, rel=1e-2)


def test_scaling_by_gpu_speed_shape_and_batch():
    base = estimate(cfg_for(), "H100")
    a100 = estimate(cfg_for(), "A100-80GB")
    gpus = known_gpus()
    assert a100.s_per_step == pytest.approx(base.s_per_step * gpus["H100"].bf16_tflops / gpus["A100-80GB"].bf16_tflops,
                                            rel=1e-3)
    assert a100.vram_gib == base.vram_gib  # memory does not depend on the GPU's speed
    longer = estimate(cfg_for(frames=161), "H100")  # 41 latent frames instead of 21: attention grows quadratically
    ratio = longer.s_per_step / base.s_per_step
    assert 41 / 21 < ratio < (41 / 21) ** 2
    assert longer.vram_gib > base.vram_gib
    assert estimate(cfg_for(batch=2), "H100").s_per_step == pytest.approx(2 * base.s_per_step, rel=1e-3)
    assert estimate(cfg_for(accum=4), "H100").s_per_step == pytest.approx(4 * base.s_per_step, rel=1e-3)
    two = estimate(cfg_for(), "H100:2")
    assert two.count == 2 and two.cost_usd_per_hour == pytest.approx(2 * base.cost_usd_per_hour)


def test_model_size_and_checkpointing_pick_their_own_rows():
    big = estimate(cfg_for("t2v-480p-14b-2.1"), "H100")
    assert big.s_per_step == pytest.approx(11.621, rel=0.02) and "naive" not in big.basis
    no_gc = estimate(cfg_for(gc=False), "H100")
    assert no_gc.s_per_step == pytest.approx(1.75, rel=0.01) and no_gc.vram_gib > 60
    assert not estimate(cfg_for(gc=False), "RTX4090").fits
    assert estimate(cfg_for(), "RTX4090").fits


def test_new_measured_row_takes_over(monkeypatch):
    """Adding a newer wanforge row (what the lead does after a benchmark) changes the estimate at once."""
    from trainer.model import sizing

    cal = dict(sizing.load_calibration())
    row = next(r for r in cal["measured"] if r["flavour"] == "t2v-480p-1.3b-2.1" and r["trainer"] == "wanforge"
               and r["gradient_checkpointing"] == "full")
    newer = dict(row, s_per_step=2.0, peak_gib=8.0, date="2099-01-01", source="test")
    monkeypatch.setattr(sizing, "load_calibration", lambda: {**cal, "measured": [*cal["measured"], newer]})
    e = estimate(cfg_for(), "H100")
    assert e.s_per_step == pytest.approx(2.0) and e.vram_gib == pytest.approx(8.0, abs=0.02)


def test_gpu_names_and_sources():
    gpus = known_gpus()
    assert {"H100", "A100-80GB", "RTX4090", "MI300X"} <= set(gpus)
    for g in gpus.values():
        assert g.spec_source and g.price_source and g.usd_per_hour > 0 and g.vendor in ("nvidia", "amd")
    assert parse_gpu("h100:4")[0].name == "H100" and parse_gpu("h100:4")[1] == 4
    with pytest.raises(UserError, match='unknown GPU.*did you mean "H100"'):
        parse_gpu("H1000")
    with pytest.raises(UserError, match="whole number"):
        parse_gpu("H100:x")


def test_cheapest_fitting_and_ordering():
    cfg = cfg_for(gc=False)  # ~65 GiB: only the 80 GB+ cards fit
    pick = cheapest_fitting(cfg, ["RTX4090", "L40S", "H100", "A100-80GB"], measured_only=False)
    fitting = [e for e in estimate_all(cfg, ["H100", "A100-80GB"])]
    assert pick.gpu == min(fitting, key=lambda e: e.cost_usd).gpu
    with pytest.raises(UserError, match="no GPU in RTX4090, L4 fits"):
        cheapest_fitting(cfg, ["RTX4090", "L4"], measured_only=False)


def test_gpu_auto_picks_among_measured_gpus_unless_asked_otherwise():
    """MI300X is cheaper per step by its datasheet TFLOP/s, but nothing was ever measured on it: `--gpu auto` takes the
    measured GPU, and refuses a list with no measured GPU instead of picking a datasheet guess."""
    from trainer.model.sizing import measured_gpus

    cfg = cfg_for("t2v-480p-14b-2.1", gc=False)
    assert "MI300X" not in measured_gpus() and "H100" in measured_gpus()
    datasheet = cheapest_fitting(cfg, ["MI300X", "H100"], measured_only=False)
    assert datasheet.gpu == "MI300X" and not datasheet.speed_measured  # what the old `auto` did
    assert cheapest_fitting(cfg, ["MI300X", "H100"]).gpu == "H100"
    with pytest.raises(UserError, match="MI300X, L40S has a measured row.*--gpu"):
        cheapest_fitting(cfg, ["MI300X", "L40S"])


def test_every_line_labels_what_was_extrapolated():
    """A card known only from its datasheet never reads "measured"; an unmeasured shape never reads "fits"."""
    cfg = config_from_dict({"model": {"flavour": "t2v-480p-1.3b-2.1"}, "datasets": [{"path": "/x"}]})
    for e in estimate_all(cfg):
        if e.gpu != "H100":
            assert not e.speed_measured and "s/step extrapolated" in e.line()
            assert "datasheet bf16 TFLOP/s" in e.basis
    big = config_from_dict({"model": {"flavour": "t2v-480p-14b-2.1"},
                            "datasets": [{"path": "/x", "num_frames": 121, "width": 960, "height": 544}]})
    e = estimate(big, "H100")
    assert e.fits and not e.measured and "not measured (extrapolated) [" in e.line() and "fits" not in e.line()


def test_estimate_cli(tmp_path, capsys):
    save_config(cfg_for(), tmp_path / "c.toml")
    assert main(["estimate", str(tmp_path / "c.toml"), "--gpu", "H100"]) == 0
    out = capsys.readouterr().out
    assert "H100" in out and "2.37 s/step" in out
    assert "not measured (extrapolated)" in out  # a custom [memory] mix (checkpointing set by hand) is scaled
    assert main(["estimate", str(tmp_path / "c.toml"), "--gpu", "H1000"]) == 2


def test_auto_memory_preset_is_resolved_per_gpu():
    """The default config (`preset = "auto"`) is estimated with the preset the trainer would pick on each GPU."""
    cfg = config_from_dict({"model": {"flavour": "t2v-480p-14b-2.1"},
                            "datasets": [{"path": "/nonexistent", "num_frames": 81, "width": 832, "height": 480}],
                            "lora": {"rank": 16}})
    h100 = estimate(cfg, "H100")  # Hopper: the image's FlashAttention 4 row
    assert h100.memory_preset == "balanced" and h100.s_per_step == pytest.approx(8.816, rel=1e-3)
    assert "FlashAttention 4" in h100.basis
    a100 = estimate(cfg, "A100-80GB")  # not Hopper: auto attention is cuDNN there, so the cuDNN row, scaled
    assert a100.memory_preset == "balanced" and a100.s_per_step == pytest.approx(9.782 * 989 / 312, rel=1e-3)
    assert "cuDNN" in a100.basis
    flash_everywhere = cfg.model_copy(update={"memory": cfg.memory.model_copy(update={"attention_backend": "flash_4_hub"})})
    assert "FlashAttention 4" in estimate(flash_everywhere, "A100-80GB").basis  # asked for explicitly
    l40s = estimate(cfg, "L40S")  # 48 GB, 64 GiB host: balanced's 50 GiB offload is too much, half of it is not
    assert l40s.memory_preset == "balanced-lean" and l40s.fits and l40s.vram_gib < 42
    rtx = estimate(cfg, "RTX4090")  # 24 GB: int8 + offload + 4096-token FF chunks, measured 21.91 GiB
    assert rtx.memory_preset == "low-int8" and rtx.fits and rtx.vram_gib == pytest.approx(21.91, abs=0.3)
    assert "[low-int8]" in rtx.line()


def test_estimate_and_auto_agree_where_no_row_measured_the_preset():
    """TI2V-5B has no preset rows: on a 24 GB card `auto` picks the preset its table says fits, and the estimate's
    VRAM is that same table's number (not the 5B no-offload row's), so it says it fits too."""
    from trainer.flavours import get_flavour
    from trainer.model.preset_choice import estimated_peak_gib

    cfg = config_from_dict({"model": {"flavour": "ti2v-5b-2.2"}, "datasets": [{"path": "/nonexistent"}]})
    rtx = estimate(cfg, "RTX4090")
    shape = est_mod.config_shape(cfg)
    assert rtx.memory_preset == "balanced"
    assert rtx.vram_gib == pytest.approx(estimated_peak_gib(get_flavour("ti2v-5b-2.2"), "balanced", shape.tokens), abs=0.01)
    assert rtx.fits and not rtx.measured and rtx.fit_label == "not measured (extrapolated)"
    h100 = estimate(cfg, "H100")
    assert h100.memory_preset == "balanced" and h100.fits and h100.s_per_step > 0


def test_every_preset_has_measured_rows_and_every_row_names_its_command():
    """The one table `auto` and the estimate share: each preset `auto` can pick has a row at both model sizes (a preset
    not measured yet: the presets that size it do, and it is never "measured"); every row says where it was measured;
    a row comes back exactly at its own shape."""
    from trainer.model.presets import PRESETS, SIZED_FROM
    from trainer.model.sizing import flavour_shape, measured_rows, predict_memory, row_shape, row_tokens

    rows = measured_rows()
    for row in rows:
        assert "bench/RESULTS.md" in row["source"]
        assert row["gpu"] in known_gpus()
    for preset in PRESETS:
        own = any(r.get("preset") == preset for r in rows)
        for width in (1536, 5120):
            for name in [preset] if own else SIZED_FROM[preset].values():
                assert any(r.get("preset") == name and row_shape(r).dim == width for r in rows), (name, width)
        if not own:
            for flavour in ("t2v-480p-1.3b-2.1", "t2v-480p-14b-2.1"):
                shape = flavour_shape(flavour)
                p = predict_memory(shape, preset, shape.tokens(81, 480, 832))
                assert not p.measured and not p.gpu_measured and p.label == "not measured (extrapolated)"
                assert f"{preset} has no measured row yet" in p.basis
    for row in (r for r in rows if r.get("preset") and r["trainer"] == "wanforge"):
        p = predict_memory(row_shape(row), row["preset"], row_tokens(row))
        if p.basis.endswith(f"({row['source']})") and p.gpu_measured:
            assert p.gpu_gib == pytest.approx(row["peak_gib"], abs=0.01)
            assert p.offload_gib == pytest.approx(row.get("offload_gib", 0.0), abs=0.01)
            assert p.measured == ("host_peak_gib" in row)
            if p.measured:
                assert p.host_gib == pytest.approx(row["host_peak_gib"], abs=0.01)


def test_wan22_a14b_at_720p_estimate_is_the_measured_row_on_a_128_gib_h100():
    """Issue 24: at its default 1280x720x81 the A14B estimate on an H100 names the preset the node picks
    (balanced-lean), the GPU and host memory measured there, and "fits" only because it was measured. The image's
    FlashAttention 4 (what `auto` runs on Hopper) rows of issue 31 are the ones it reads."""
    for flavour, s_per_step in (("t2v-14b-2.2-high", 36.663), ("i2v-14b-2.2-high", 36.706)):
        cfg = config_from_dict({"model": {"flavour": flavour}, "datasets": [{"path": "/x"}]})
        e = estimate(cfg, "H100")
        assert e.memory_preset == "balanced-lean" and e.fits and e.measured and e.speed_measured
        assert e.vram_gib == pytest.approx(52.48, abs=0.01) and 59 < e.host_gib < 61.5 and e.host_ram_gib == 128
        assert e.s_per_step == pytest.approx(s_per_step, rel=1e-3)
        assert ", fits [row " in e.line() and "host RAM 128 GiB assumed" in e.basis
        a100 = estimate(cfg, "A100-80GB")  # never run on an A100: memory and speed both labelled as scaled
        assert a100.fits and not a100.measured and not a100.speed_measured
        assert "not measured (extrapolated)" in a100.line() and "s/step extrapolated" in a100.line()
    longer = config_from_dict({"model": {"flavour": "t2v-14b-2.2-high"},
                               "datasets": [{"path": "/x", "num_frames": 49}]})
    assert estimate(longer, "H100").fit_label == "not measured (extrapolated)"


def test_each_figure_names_its_measured_row_and_the_footer_agrees(tmp_path, capsys):
    """Every GPU's line cites the [[measured]] rows its memory and s/step are scaled from; the footer lists exactly
    those rows; a measured s/step is its row's own number (the H100 with FlashAttention 4: 1.753, not the cuDNN
    row's 2.006); no label is wrapped in two pairs of brackets."""
    import re

    from trainer.model import sizing

    (tmp_path / "c.toml").write_text('[model]\nflavour = "t2v-480p-1.3b-2.1"\n[[datasets]]\npath = "clips"\n'
                                     'num_frames = 81\nwidth = 832\nheight = 480\n[lora]\nrank = 32\n')  # docs' wan13b
    cfg = load_config(tmp_path / "c.toml")
    assert main(["estimate", str(tmp_path / "c.toml")]) == 0
    out = capsys.readouterr().out.splitlines()
    table = [line for line in out if re.match(r"\s+\S+: +[\d.]+ GiB/GPU", line)]
    footer = {int(m.group(1)): line for line in out if (m := re.match(r"\s+row (\d+): ", line))}
    assert len(table) == len(estimate_all(cfg)) and footer
    cited = {int(n) for line in table for n in re.findall(r"\[row (\d+)\]", line)}
    assert cited == set(footer)
    rows = sizing.measured_rows()
    for line in table:
        assert "((" not in line and "))" not in line and ") (" not in line
        speed_row = int(re.search(r"s/step \w+ (?:incl\. [^\[]*)?\[row (\d+)\]", line).group(1))
        seconds = float(re.search(r"([\d.]+) s/step", line).group(1))
        if "s/step measured" in line:
            assert seconds == pytest.approx(rows[speed_row - 1]["s_per_step"], abs=0.005)
            assert f"{rows[speed_row - 1]['s_per_step']} s/step" in footer[speed_row]
    h100 = next(line for line in table if line.strip().startswith("H100:"))
    assert "1.78 s/step measured" in h100 and "FlashAttention 4" in footer[int(re.search(
        r"s/step measured \[row (\d+)\]", h100).group(1))]


def _row_config(row):
    """The config a measured row ran: its model, clip, rank, batch, preset, attention kernel."""
    return config_from_dict({
        "model": {"flavour": row["flavour"]},
        "datasets": [{"path": "/nonexistent", "num_frames": row["num_frames"], "width": row["width"],
                      "height": row["height"]}],
        "lora": {"rank": row["lora_rank"]}, "train": {"train_batch_size": row["batch"]},
        "memory": {"preset": row["preset"], "attention_backend": row.get("attention_backend", "_native_cudnn")},
    })


def test_the_estimate_is_within_ten_percent_of_every_measured_preset_row_on_h100_and_h200():
    """Issue 31: GPU memory, host RAM and s/step of every wanforge row measured with a preset (launcher/calibration.toml,
    each from bench/RESULTS.md), on the card it ran on and on the other Hopper card (H100 <-> H200: the same bf16
    rate; the H200 rows measured so far were within a few percent of the H100's)."""
    from trainer.model import sizing

    rows = [r for r in sizing.load_calibration()["measured"]
            if r["trainer"] == "wanforge" and r.get("preset") and not r.get("shards")]
    assert len(rows) >= 25 and {r["gpu"] for r in rows} >= {"H100", "H200"}
    off = []
    for row in rows:
        for gpu in (row["gpu"], {"H100": "H200", "H200": "H100"}[row["gpu"]]):
            e = estimate(_row_config(row), gpu)
            pairs = [("s/step", e.s_per_step, row["s_per_step"]), ("GPU GiB", e.vram_gib, row["peak_gib"])]
            if row.get("host_peak_gib"):
                pairs.append(("host GiB", e.host_gib, row["host_peak_gib"]))
            off += [f"{row['flavour']} {row['preset']} on {gpu}: {what} {got} vs measured {want}"
                    for what, got, want in pairs if abs(got - want) > 0.10 * want]
    assert off == []
