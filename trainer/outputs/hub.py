"""Publishing to the Hugging Face Hub in the background: checkpoints as they are saved, then the final LoRA with
a model card and a validation preview.

Uploads go through huggingface_hub's own background queue (`run_as_future`: one worker, in order), so training
never waits for the network. Files are hard-linked (or copied) into a staging folder first, so pruning an old
checkpoint while it uploads does no harm. The token is whatever huggingface_hub finds (HF_TOKEN in the environment,
`hf auth login`, a Colab secret); wanforge never reads, passes or prints it.

Every upload is retried with exponential backoff (`with_retries`), and the final one is verified by asking the Hub
for the uploaded paths and sizes back (`verify_uploaded`): a LoRA is "published" only once the Hub lists it. The
node's run-folder upload (launcher/node.py) uses the same two helpers.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path

from trainer.config.schema import WanforgeConfig
from trainer.errors import UserError
from trainer.outputs.finite import require_finite_files
from trainer.rundir import RunDir

log = logging.getLogger(__name__)

UPLOAD_ATTEMPTS_ENV = "WANFORGE_UPLOAD_ATTEMPTS"  # tries per upload (default 5)
UPLOAD_BACKOFF_ENV = "WANFORGE_UPLOAD_BACKOFF_S"  # first wait between tries, doubled each time (default 5 s)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{err.__class__.__name__}: {text.splitlines()[0] if text else ''}"


def with_retries(what: str, fn: Callable[[], object], attempts: int | None = None, first_wait_s: float | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> object:
    """fn() with up to `attempts` tries, waiting first_wait_s, 2x, 4x ... between them; the last error is raised.

    Written here because huggingface_hub retries only single HTTP calls (5xx, rate limits), not a whole commit."""
    attempts = attempts or int(os.environ.get(UPLOAD_ATTEMPTS_ENV) or 5)
    wait = float(os.environ.get(UPLOAD_BACKOFF_ENV) or 5.0) if first_wait_s is None else first_wait_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if attempt == attempts:
                raise
            log.warning("%s failed (%s); try %d of %d in %.0f s", what, first_line(err), attempt + 1, attempts, wait)
            sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def local_files(folder: Path, prefix: str = "", skip: Callable[[str], bool] = lambda rel: False) -> dict[str, int]:
    """path in the repo -> size, for every file under `folder` (relative paths joined to `prefix`)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not skip(rel):
            found[f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel] = path.stat().st_size
    return found


def verify_uploaded(api, repo_id: str, expected: dict[str, int], repo_type: str = "model") -> None:
    """Ask the Hub for `expected` (path -> size) back; raises UploadNotVerified naming what is missing or different."""
    listed: dict[str, int | None] = {}
    paths = list(expected)
    for start in range(0, len(paths), 500):  # the paths-info endpoint takes a bounded list
        for info in api.get_paths_info(repo_id, paths[start:start + 500], repo_type=repo_type):
            if getattr(info, "size", None) is not None:
                listed[info.path] = info.size
    missing = [p for p in paths if p not in listed]
    wrong = [p for p in paths if p in listed and listed[p] != expected[p]]
    if missing or wrong:
        parts = ([f"missing {len(missing)} file(s), e.g. {', '.join(missing[:3])}"] if missing else []) + \
                ([f"{len(wrong)} file(s) of another size, e.g. {', '.join(wrong[:3])}"] if wrong else [])
        raise UploadNotVerified(f"the Hub repo {repo_id} does not list what was uploaded: {'; '.join(parts)}")


class UploadNotVerified(RuntimeError):
    """The upload call returned, but the Hub does not list the files back."""


def tracker_note(trackers: Iterable) -> Callable[[str], None]:
    """A callback that puts an upload failure line in the experiment tracker: a W&B alert, a TensorBoard text."""

    def note(line: str) -> None:
        for tracker in trackers:
            try:
                if tracker.name == "wandb":
                    tracker.run.alert(title="wanforge: Hub upload failed", text=line)
                elif tracker.name == "tensorboard":
                    tracker.writer.add_text("wanforge/upload_error", line)
            except Exception:  # the tracker is a report channel: its own trouble must not stop training
                log.exception("sending an upload failure to %s failed", tracker.name)

    return note


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
        if "/" not in self.repo_id:  # a bare name lives in the token owner's account: say which repo it is
            self.repo_id = f"{self._owner()}/{self.repo_id}"
        self.staging = run.root / ".hub-staging"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.futures: list[tuple[str, Future]] = []
        self._queue("create repo", self.api.create_repo, repo_id=self.repo_id, private=cfg.hub.private,
                    exist_ok=True, repo_type="model")

    def _owner(self) -> str:
        try:
            return self.api.whoami()["name"]
        except Exception as err:  # network, bad token: huggingface_hub raises assorted types
            raise UserError(f'hub.hub_model_id "{self.repo_id}" has no account: asking the Hub whose token this is '
                            f"failed ({err.__class__.__name__}); write it as \"your-user/{self.repo_id}\"") from None

    @classmethod
    def maybe(cls, cfg: WanforgeConfig, run: RunDir, on_error: Callable[[str], None] | None = None) -> HubPublisher | None:
        if not (cfg.hub.push_to_hub or cfg.hub.push_checkpoints_to_hub):
            return None
        return cls(cfg, run, on_error=on_error)

    def _queue(self, what: str, fn, verify: dict[str, int] | None = None, **kwargs) -> Future:
        def attempt() -> object:
            result = fn(**kwargs)
            if verify is not None:
                verify_uploaded(self.api, self.repo_id, verify)
            return result

        future = self.api.run_as_future(with_retries, f"Hub upload of {what} to {self.repo_id}", attempt)
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

    def _upload(self, what: str, folder: Path, path_in_repo: str | None, message: str, verify: bool = False) -> Future:
        expected = local_files(folder, path_in_repo or "") if verify else None
        future = self._queue(what, self.api.upload_folder, expected, repo_id=self.repo_id, folder_path=str(folder),
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
        return self._upload(FINAL, staged, None, f"LoRA after {step} steps (wanforge)", verify=True)

    def _failure(self, what: str, future: Future) -> str | None:
        err = future.exception()
        if err is None:
            return None
        return f"Hub upload of {what} to {self.repo_id} failed: {first_line(err)}"

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

    def final_failure(self, failures: list[str]) -> str | None:
        """The line of a failed (or unverified) final LoRA upload among `wait()`'s failures, else None."""
        return next((line for line in failures if f"of {FINAL} to" in line), None)


FINAL = "final LoRA"


def final_upload_remedy(repo_id: str, run_root: Path) -> str:
    """What the user does when the final upload did not verify: the LoRA is in the run folder, push it by hand."""
    return (f"the LoRA is in {run_root}; check the token can write to {repo_id} (a write token in HF_TOKEN), then "
            f"upload it: hf upload {repo_id} {run_root} . --include '*.safetensors' 'config.toml'")


def publish_final(publisher: HubPublisher | None, cfg: WanforgeConfig, run: RunDir, settings, lora_file: Path,
                  ema_lora_file: Path | None, last_round, step: int) -> Future | None:
    """Queue the final upload: the LoRA (and its EMA twin), the resolved config, the last validation as a preview,
    and the model card describing them."""
    from trainer.outputs.model_card import build_model_card

    if publisher is None or not cfg.hub.push_to_hub:
        return None
    files = {lora_file.name: lora_file, "config.toml": run.config}
    if ema_lora_file is not None:
        files[f"ema/{ema_lora_file.name}"] = ema_lora_file
    from trainer.outputs.export import DIFFUSERS_FILE

    for folder, prefix in ((lora_file.parent, ""), (ema_lora_file.parent if ema_lora_file else None, "ema/")):
        twin = folder / DIFFUSERS_FILE if folder is not None else None
        if twin is not None and twin.is_file() and f"{prefix}{twin.name}" not in files:  # a VACE LoRA's diffusers twin
            files[f"{prefix}{twin.name}"] = twin
    videos, sheet = [], None
    if last_round is not None:
        for r in last_round.videos:
            files[f"media/{r.path.name}"] = r.path
            videos.append((f"media/{r.path.name}", r.prompt.text + (" (EMA weights)" if r.variant == "ema" else "")))
        sheet = f"media/{last_round.sheet.name}"
        files[sheet] = last_round.sheet
    if publisher.repo_id != cfg.hub.hub_model_id:  # a bare name, resolved to the token owner's account
        cfg = cfg.model_copy(update={"hub": cfg.hub.model_copy(update={"hub_model_id": publisher.repo_id})})
    card = build_model_card(cfg, settings, lora_file.name, step, videos, sheet,
                            f"ema/{ema_lora_file.name}" if ema_lora_file is not None else None)
    return publisher.push_final(files, card, step)
