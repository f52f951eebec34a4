"""Webhooks: progress, validation images and errors posted to a URL from a background thread.

`tracking.webhook_config` names a JSON file:

    {"url": "https://discord.com/api/webhooks/...",   # or "url_env": "NAME" to read it from the environment
     "format": "discord",                              # or "raw": one JSON object per event
     "levels": ["info", "progress", "validation", "error"],
     "progress_every_n_steps": 100}

Posting never blocks or fails training: events go through a bounded queue to one daemon thread; a full queue drops
the event, a failed post is logged once per kind (without the URL, which is a secret for Discord).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import UserError

log = logging.getLogger(__name__)

LEVELS = ("info", "progress", "validation", "error")
FORMATS = ("discord", "raw")
DISCORD_TEXT_LIMIT = 2000


@dataclass(frozen=True)
class WebhookConfig:
    url: str = field(repr=False)
    format: str = "discord"
    levels: tuple[str, ...] = LEVELS
    progress_every_n_steps: int = 100
    timeout_s: float = 10.0


@dataclass(frozen=True)
class Event:
    level: str
    message: str
    step: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    images: tuple[Path, ...] = ()


def load_webhook_config(path: Path) -> WebhookConfig:
    where = f"tracking.webhook_config ({path})"
    if not path.is_file():
        raise UserError(f"{where}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f'{where}: expected an object like {{"url": "...", "format": "discord"}}')
    unknown = set(data) - {"url", "url_env", "format", "levels", "progress_every_n_steps", "timeout_s"}
    if unknown:
        raise UserError(f"{where}: unknown keys {sorted(unknown)} (url, url_env, format, levels, progress_every_n_steps, timeout_s)")
    url = data.get("url") or (os.environ.get(data["url_env"], "") if data.get("url_env") else "")
    if not url:
        hint = f'the environment variable {data["url_env"]} is empty' if data.get("url_env") else 'set "url" or "url_env"'
        raise UserError(f"{where}: no URL: {hint}")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"{where}: the URL must start with http:// or https://")
    fmt = data.get("format", "discord")
    if fmt not in FORMATS:
        raise UserError(f'{where}: format must be "discord" or "raw" (got {fmt!r})')
    levels = tuple(data.get("levels", LEVELS))
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise UserError(f"{where}: unknown levels {bad}: choose from {list(LEVELS)}")
    every = data.get("progress_every_n_steps", 100)
    if not isinstance(every, int) or every < 1:
        raise UserError(f"{where}: progress_every_n_steps must be a whole number, 1 or more")
    return WebhookConfig(url=url, format=fmt, levels=levels, progress_every_n_steps=every,
                         timeout_s=float(data.get("timeout_s", 10.0)))


def _discord_request(event: Event, run_name: str) -> dict[str, Any]:
    """httpx keyword arguments for Discord: a message, with the images as attachments."""
    lines = [f"**{run_name}** [{event.level}]" + (f" step {event.step}" if event.step is not None else ""), event.message]
    lines += [f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}" for k, v in event.fields.items()]
    content = "\n".join(lines)[:DISCORD_TEXT_LIMIT]
    payload: dict[str, Any] = {"content": content, "username": "wanforge"}
    if not event.images:
        return {"json": payload}
    payload["attachments"] = [{"id": i, "filename": p.name} for i, p in enumerate(event.images)]
    files = {f"files[{i}]": (p.name, p.read_bytes(), _content_type(p)) for i, p in enumerate(event.images)}
    return {"data": {"payload_json": json.dumps(payload)}, "files": files}


def _raw_request(event: Event, run_name: str) -> dict[str, Any]:
    body = {
        "run": run_name, "level": event.level, "message": event.message, "step": event.step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "fields": event.fields,
        "images": [{"filename": p.name, "content_type": _content_type(p),
                    "data_base64": base64.b64encode(p.read_bytes()).decode("ascii")} for p in event.images],
    }
    return {"json": body}


def _content_type(path: Path) -> str:
    return {".png": "image/png", ".jpg": "image/jpeg", ".mp4": "video/mp4", ".gif": "image/gif"}.get(
        path.suffix.lower(), "application/octet-stream")


class Webhooks:
    """Non-blocking sender. With no config every method is a no-op, so callers never check."""

    def __init__(self, config: WebhookConfig | None, run_name: str, max_queue: int = 64):
        self.config, self.run_name = config, run_name
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self._warned: set[str] = set()
        self._queue: queue.Queue[Event | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        if config is not None:
            self._thread = threading.Thread(target=self._worker, name="wanforge-webhooks", daemon=True)
            self._thread.start()

    @classmethod
    def from_config(cls, path: Path | None, run_name: str) -> Webhooks:
        return cls(load_webhook_config(path) if path is not None else None, run_name)

    # ---------------------------------------------------------------- events
    def send(self, level: str, message: str, step: int | None = None, images: list[Path] = (), **fields: Any) -> None:
        if self.config is None or level not in self.config.levels:
            return
        try:
            self._queue.put_nowait(Event(level, message, step, fields, tuple(images)))
        except queue.Full:
            self.dropped += 1

    def progress(self, step: int, max_steps: int, record: dict[str, Any]) -> None:
        if self.config is not None and (step % self.config.progress_every_n_steps == 0 or step == max_steps):
            fields = {k: v for k, v in record.items() if k != "step"}
            self.send("progress", f"step {step}/{max_steps}", step=step, **fields)

    def error(self, err: BaseException, step: int | None = None) -> None:
        self.send("error", f"training stopped: {err.__class__.__name__}: {err}"[:1500], step=step)

    # ---------------------------------------------------------------- delivery
    def _worker(self) -> None:
        import httpx

        with httpx.Client(timeout=self.config.timeout_s) as client:
            while True:
                event = self._queue.get()
                try:
                    if event is None:
                        return
                    self._post(client, event)
                finally:
                    self._queue.task_done()

    def _post(self, client, event: Event) -> None:
        try:
            build = _discord_request if self.config.format == "discord" else _raw_request
            response = client.post(self.config.url, **build(event, self.run_name))
            response.raise_for_status()
            self.sent += 1
        except Exception as err:  # never let a webhook fail the run
            self.failed += 1
            kind = f"{err.__class__.__name__}"
            if kind not in self._warned:
                self._warned.add(kind)
                status = getattr(getattr(err, "response", None), "status_code", None)
                log.warning("webhook %s event not delivered (%s%s); training goes on", event.level, kind,
                            f", HTTP {status}" if status else "")

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (waiting at most `timeout` seconds), then stop the thread."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
        self._thread = None
