"""EMA of the adapter: update interval and decay, which weights each ema.validation setting renders, exact resume."""

import numpy as np
import pytest
import torch

from conftest import tiny_config
from trainer.config.training import EmaConfig
from trainer.loop.train import train
from trainer.model.components import load_transformer, load_vae
from trainer.model.ema import AdapterEMA, validation_variants, weights_for
from trainer.model.lora import add_lora, trainable_parameters
from trainer.outputs.export import read_lora
from trainer.outputs.validation_round import validation_round
from trainer.outputs.validation_videos import ValidationPrompt, ValidationSettings, build_pipeline, generate


class Crash(RuntimeError):
    pass


def test_updates_every_interval_with_warmed_up_decay():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA([param], EmaConfig(use_ema=True, decay=0.5, update_interval=2))
    with torch.no_grad():
        param.fill_(1.0)
    ema.after_step(1)
    assert ema.shadow[0].tolist() == [0.0] * 3  # not an update step
    ema.after_step(2)
    assert ema.shadow[0].tolist() == [1.0] * 3  # the first update copies (decay warms up from 0)
    with torch.no_grad():
        param.fill_(3.0)
    ema.after_step(4)
    decay = min(0.5, 2 / 11)  # diffusers' warmup (1+n)/(10+n), capped by the configured decay
    assert ema.shadow[0] == pytest.approx(torch.full((3,), 1.0 + (1 - decay) * 2.0))
    assert param.tolist() == [3.0] * 3  # the live weights are never touched by an update


def test_each_setting_renders_with_its_weights(clips, tmp_path):
    cfg = tiny_config(clips, tmp_path)
    transformer, vae = load_transformer(cfg.model), load_vae(cfg.model)
    add_lora(transformer, cfg.lora)
    params = trainable_parameters(transformer)
    ema = AdapterEMA(params, EmaConfig(use_ema=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # live and averaged weights far apart, so their videos differ clearly
        for p, shadow in zip(params, ema.shadow):
            p.normal_(0, 0.3, generator=g)
            shadow.normal_(0, 0.3, generator=g)
    live = [p.detach().clone() for p in params]
    settings = ValidationSettings((ValidationPrompt("p", "p"),), "n", 5, 32, 32, 5.0, "unipc", 3.0, 2, 0, 16)
    embeds = {"p": torch.randn(6, 32, generator=g), "n": torch.randn(4, 32, generator=g)}
    pipe = build_pipeline(transformer, vae, settings)
    cpu = torch.device("cpu")
    reference = {"": generate(pipe, settings, embeds["p"], embeds["n"], cpu)}
    with ema.swapped_in():
        assert all(torch.equal(p, s) for p, s in zip(params, ema.shadow))
        reference["ema"] = generate(pipe, settings, embeds["p"], embeds["n"], cpu)
    assert not np.allclose(reference[""], reference["ema"], atol=1e-3)

    for setting, expected in (("none", [""]), ("ema_only", ["ema"]), ("comparison", ["", "ema"])):
        variants = [(v, weights_for(v, ema)) for v in validation_variants(ema, setting)]
        result = validation_round(pipe, settings, embeds, tmp_path / setting, cpu, None, variants)
        assert [r.variant for r in result.videos] == expected
        for r in result.videos:
            np.testing.assert_array_equal(r.frames, reference[r.variant])
            assert r.path.name == ("p-ema.mp4" if r.variant else "p.mp4") and r.path.is_file()
        assert all(torch.equal(p, saved) for p, saved in zip(params, live))  # live weights back, bit for bit
    assert validation_variants(None, "comparison") == [""]  # without EMA there is only the live adapter


def test_ema_lora_is_saved_and_resumes_exactly(clips, tmp_path):
    settings = dict(train={"max_train_steps": 6}, ema={"use_ema": True, "decay": 0.9, "update_interval": 1},
                    checkpoint={"every_n_steps": 2, "total_limit": 2},
                    validation={"at_end": False, "eval_every_n_steps": 0})
    straight = train(tiny_config(clips, tmp_path / "straight", **settings), show_progress=False)
    live, _, _ = read_lora(straight.lora_file)
    ema, _, _ = read_lora(straight.run_dir / "lora" / "ema" / straight.lora_file.name)
    assert live.keys() == ema.keys()
    assert any(not torch.allclose(live[k], ema[k]) for k in live)  # the average lags the live weights

    cfg = tiny_config(clips, tmp_path / "crashed", **settings)

    def crash_at_3(step):
        if step == 3:
            raise Crash("simulated crash")

    with pytest.raises(Crash):
        train(cfg, show_progress=False, on_step=crash_at_3)
    resumed = train(cfg, resume="latest", show_progress=False)  # from step 2: the EMA comes from the checkpoint
    ema_resumed, _, _ = read_lora(resumed.run_dir / "lora" / "ema" / resumed.lora_file.name)
    for key in ema:
        torch.testing.assert_close(ema_resumed[key], ema[key], rtol=1e-5, atol=1e-7)
