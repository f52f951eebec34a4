"""The validation render's speed levers change nothing but speed: compiled blocks give the same video."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config.model import LoraConfig, ModelConfig
from trainer.model.components import load_transformer, load_vae
from trainer.model.lora import add_lora, trainable_parameters
from trainer.outputs.validation_videos import ValidationPrompt, ValidationSettings, build_pipeline, compiled_blocks, generate


def _tiny_pipe():
    model = ModelConfig(flavour="tiny")
    transformer, vae = load_transformer(model), load_vae(model)
    add_lora(transformer, LoraConfig(rank=4))
    with torch.no_grad():
        for p in trainable_parameters(transformer):
            p.normal_(0, 0.05)
    settings = ValidationSettings((ValidationPrompt("p", "p"),), "n", 5, 32, 32, 5.0, "unipc", 3.0, 3, 0, 16)
    pipe = build_pipeline(transformer, vae, settings)
    g = torch.Generator().manual_seed(0)
    return pipe, settings, transformer, torch.randn(6, 32, generator=g), torch.randn(9, 32, generator=g)


def test_compiled_blocks_render_the_same_video():
    pipe, settings, transformer, prompt, negative = _tiny_pipe()
    cpu = torch.device("cpu")
    eager = generate(pipe, settings, prompt, negative, cpu)
    graphs = []

    def backend(gm, example_inputs):  # dynamo's graph of a block, run as traced (no C++ toolchain needed)
        graphs.append(gm)
        return gm.forward

    with compiled_blocks([transformer], backend=backend):
        assert all(b._compiled_call_impl is not None for b in transformer.blocks)
        compiled = generate(pipe, settings, prompt, negative, cpu)
    assert all(b._compiled_call_impl is None for b in transformer.blocks)  # training runs its own compiled runner
    assert 1 <= len(graphs) <= 2  # the blocks ran through the compiled function, sharing its graph
    np.testing.assert_allclose(compiled, eager, atol=1e-5)


def test_a_failing_compile_renders_without_it(monkeypatch):
    """torch.compile failing inside a render (no C++ compiler, an unsupported op) costs a warning, not the video."""
    import trainer.outputs.validation_videos as vv

    pipe, settings, transformer, prompt, negative = _tiny_pipe()
    cpu = torch.device("cpu")
    eager = generate(pipe, settings, prompt, negative, cpu)

    def broken(backend):
        def call(block, *args, **kwargs):
            raise torch._dynamo.exc.TorchDynamoException("inductor failed")
        return call

    monkeypatch.setattr(vv, "COMPILE_ON", ("cpu",))
    monkeypatch.setattr(vv, "_COMPILE_FAILED", [])
    monkeypatch.setattr(vv, "_compiled_block_call", broken)
    transformer.train()  # as training hands it over
    frames = generate(pipe, settings, prompt, negative, cpu)
    np.testing.assert_allclose(frames, eager, atol=1e-6)
    assert vv._COMPILE_FAILED and all(b._compiled_call_impl is None for b in transformer.blocks)
    assert transformer.training  # left as it was found


@pytest.mark.parametrize(("memory", "compiles"), [({}, True), ({"preset": "none"}, False),
                                                   ({"preset": "none", "compile": True}, True),
                                                   ({"preset": "balanced", "compile": False}, False)])
def test_validation_compiles_when_training_does(memory, compiles, tmp_path):
    from trainer.config.files import config_from_dict
    from trainer.outputs.validation_videos import settings_for

    cfg = config_from_dict({"model": {"flavour": "tiny"}, "memory": memory, "datasets": [{"path": str(tmp_path)}]})
    assert settings_for(cfg, "a caption").compile is compiles
