"""The validation render's speed levers change nothing but speed: compiled blocks give the same video."""

from __future__ import annotations

import numpy as np
import torch

from trainer.components import load_transformer, load_vae
from trainer.config import LoraConfig, ModelConfig
from trainer.lora import add_lora, trainable_parameters
from trainer.validation_videos import ValidationPrompt, ValidationSettings, build_pipeline, compiled_blocks, generate


def test_compiled_blocks_render_the_same_video():
    model = ModelConfig(flavour="tiny")
    transformer, vae = load_transformer(model), load_vae(model)
    add_lora(transformer, LoraConfig(rank=4))
    with torch.no_grad():
        for p in trainable_parameters(transformer):
            p.normal_(0, 0.05)
    settings = ValidationSettings((ValidationPrompt("p", "p"),), "n", 5, 32, 32, 5.0, "unipc", 3.0, 3, 0, 16)
    pipe = build_pipeline(transformer, vae, settings)
    g = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(6, 32, generator=g), torch.randn(9, 32, generator=g)
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
