"""Shared fixtures: one tiny Wan and one set of generated clips per test session, all offline on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


def system_tool(*names: str, install: str) -> str:
    """The path of the first of `names` on PATH. A system program (not a Python package) that the README's install does
    not bring: where it is missing the test skips with `install` as the hint, except in CI (CI=true), where .ci/run
    installs it and a missing one is a failure, so that CI never passes by skipping."""
    import shutil

    for name in names:
        found = shutil.which(name)
        if found:
            return found
    message = f"{names[0]} is not installed here: {install}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (CI=true: .ci/run installs it)")
    pytest.skip(message)


RSYNC_HINT = "apt-get install rsync (or brew install rsync)"


@pytest.fixture
def rsync() -> str:
    """`wanforge sync` copies node run folders with rsync."""
    return system_tool("rsync", install=RSYNC_HINT)


@pytest.fixture(scope="session", autouse=True)
def wanforge_home(tmp_path_factory) -> Path:
    """The tiny model is built once into a session folder (never into the user's cache)."""
    home = tmp_path_factory.mktemp("wanforge_home")
    os.environ["WANFORGE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> Path:
    from trainer.demo.world import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("clips"))


@pytest.fixture(scope="session")
def few_clips(clips, tmp_path_factory) -> Path:
    """Two of the demo clips: enough for a batch of 2, and a quarter of the caching time."""
    import shutil

    target = tmp_path_factory.mktemp("few_clips")
    for path in sorted(clips.glob("clip_0[01].*")):
        shutil.copy(path, target / path.name)
    return target


@pytest.fixture
def dataset_copy(clips, tmp_path) -> Path:
    """A private copy of the clips, for tests that build or inspect caches."""
    import shutil

    target = tmp_path / "data"
    shutil.copytree(clips, target, ignore=shutil.ignore_patterns(".wanforge_cache"))
    return target


def tiny_config(data: Path, out: Path, **sections):
    """The demo config with per-test overrides: tiny_config(data, out, train={"max_train_steps": 4})."""
    from trainer.config.files import config_from_dict, to_toml_dict
    from trainer.demo.world import demo_config

    raw = to_toml_dict(demo_config(data, out))
    for section, values in sections.items():
        if section == "datasets":
            raw["datasets"][0].update(values)
        else:
            raw.setdefault(section, {}).update(values)
    return config_from_dict(raw, source="test")
