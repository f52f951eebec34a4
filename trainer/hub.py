"""Publishing to the Hugging Face Hub in the background: checkpoints as they are saved, then the final LoRA with
a model card and a validation preview.

Uploads go through huggingface_hub's own background queue (`run_as_future`: one worker, in order), so training
never waits for the network. Files are hard-linked (or copied) into a staging folder first, so pruning an old
checkpoint while it uploads does no harm. The token is whatever huggingface_hub finds (HF_TOKEN in the environment,
`hf auth login`, a Colab secret); wanforge never reads, passes or prints it.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from trainer.config import WanforgeConfig
from trainer.errors import UserError
from trainer.guard import require_finite_files
from trainer.rundir import RunDir

log = logging.getLogger(__name__)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard links where the filesystem allows them (no copy of big files), copies elsewhere."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


class HubPublisher:
    def __init__(self, cfg: WanforgeConfig, run: RunDir, api=None, on_error: Callable[[str], None] | None = None):
        from huggingface_hub import HfApi, get_token

        self.cfg, self.run, self.on_error = cfg, run, on_error
        self.repo_id = cfg.hub.hub_model_id
        if api is None:
            if get_token() is None:
                raise UserError(
                    "hub.push_to_hub: no Hugging Face token found: set HF_TOKEN in the environment "
                    "(a write token; on SkyPilot pass --secret HF_TOKEN, in Colab add an HF_TOKEN secret)"
                )
            api = HfApi()
        self.api = api
        self.staging = run.root / ".hub-staging"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.futures: list[tuple[str, Future]] = []
        self._queue("create repo", self.api.create_repo, repo_id=self.repo_id, private=cfg.hub.private,
                    exist_ok=True, repo_type="model")

    @classmethod
    def maybe(cls, cfg: WanforgeConfig, run: RunDir, on_error: Callable[[str], None] | None = None) -> HubPublisher | None:
        if not (cfg.hub.push_to_hub or cfg.hub.push_checkpoints_to_hub):
            return None
        return cls(cfg, run, on_error=on_error)

    def _queue(self, what: str, fn, **kwargs) -> Future:
        future = self.api.run_as_future(fn, **kwargs)
        future.add_done_callback(lambda f: self._report(what, f))
        self.futures.append((what, future))
        return future

    def _report(self, what: str, future: Future) -> None:
        """Runs in the upload thread as each upload ends: a failure is logged (and sent on) at once, never raised."""
        line = self._failure(what, future)
        if line is None:
            return
        log.error(line)
        if self.on_error is not None:
            try:
                self.on_error(line)
            except Exception:  # a reporting problem must not hide the upload problem
                log.exception("reporting a Hub upload failure failed")

    def _upload(self, what: str, folder: Path, path_in_repo: str | None, message: str) -> Future:
        future = self._queue(what, self.api.upload_folder, repo_id=self.repo_id, folder_path=str(folder),
                             path_in_repo=path_in_repo, commit_message=message, repo_type="model")
        future.add_done_callback(lambda _f: shutil.rmtree(folder, ignore_errors=True))
        return future

    def push_checkpoint(self, checkpoint: Path, step: int) -> Future | None:
        if not self.cfg.hub.push_checkpoints_to_hub:
            return None
        require_finite_files(sorted(checkpoint.iterdir()), f"checkpoint step {step} for the Hub")
        staged = self.staging / f"checkpoint-{step}"
        shutil.rmtree(staged, ignore_errors=True)
        _link_tree(checkpoint, staged)
        return self._upload(f"checkpoint step {step}", staged, f"checkpoints/{checkpoint.name}", f"checkpoint at step {step}")

    def push_final(self, files: dict[str, Path], card: str, step: int) -> Future | None:
        """files: path in the repo -> local file (LoRA files, preview media); card: the README.md text."""
        if not self.cfg.hub.push_to_hub:
            return None
        require_finite_files(list(files.values()), "the final upload to the Hub")
        staged = self.staging / "final"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for name, path in files.items():
            target = staged / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        (staged / "README.md").write_text(card, encoding="utf-8")
        return self._upload("final LoRA", staged, None, f"LoRA after {step} steps (wanforge)")

    def _failure(self, what: str, future: Future) -> str | None:
        err = future.exception()
        if err is None:
            return None
        first = str(err).splitlines()[0] if str(err) else ""
        return f"Hub upload of {what} to {self.repo_id} failed: {err.__class__.__name__}: {first}"

    def wait(self, timeout: float | None = None) -> list[str]:
        """Wait for every queued upload (the final one included); returns the failures, one line each."""
        failures = []
        for what, future in self.futures:
            try:
                future.result(timeout=timeout)
            except Exception:  # logged by _report as it happened
                failures.append(self._failure(what, future) if future.done()
                                else f"Hub upload of {what} to {self.repo_id} still running after {timeout} s")
        self.futures = [(w, f) for w, f in self.futures if not f.done()]
        return failures


def publish_final(publisher: HubPublisher | None, cfg: WanforgeConfig, run: RunDir, settings, lora_file: Path,
                  ema_lora_file: Path | None, last_round, step: int) -> Future | None:
    """Queue the final upload: the LoRA (and its EMA twin), the resolved config, the last validation as a preview,
    and the model card describing them."""
    from trainer.model_card import build_model_card

    if publisher is None or not cfg.hub.push_to_hub:
        return None
    files = {lora_file.name: lora_file, "config.toml": run.config}
    if ema_lora_file is not None:
        files[f"ema/{ema_lora_file.name}"] = ema_lora_file
    videos, sheet = [], None
    if last_round is not None:
        for r in last_round.videos:
            files[f"media/{r.path.name}"] = r.path
            videos.append((f"media/{r.path.name}", r.prompt.text + (" (EMA weights)" if r.variant == "ema" else "")))
        sheet = f"media/{last_round.sheet.name}"
        files[sheet] = last_round.sheet
    card = build_model_card(cfg, settings, lora_file.name, step, videos, sheet,
                            f"ema/{ema_lora_file.name}" if ema_lora_file is not None else None)
    return publisher.push_final(files, card, step)
