"""Webhooks posted to a local HTTP server: Discord and raw payloads, levels, never blocking or failing training."""

import base64
import json
import threading
import time
from email.parser import BytesParser
from email.policy import default
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import tiny_config
from trainer.errors import UserError
from trainer.loop.train import train
from trainer.outputs.webhooks import Webhooks, load_webhook_config


class Receiver:
    """Records each POST as (content type, body); answers `status`, after `delay` seconds."""

    def __init__(self, status: int = 204, delay: float = 0.0):
        self.posts: list[tuple[str, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(delay)
                receiver.posts.append((self.headers.get("Content-Type", ""), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def json_bodies(self) -> list[dict]:
        return [json.loads(body) for ctype, body in self.posts if ctype.startswith("application/json")]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _config(tmp_path, **data):
    path = tmp_path / "webhook.json"
    path.write_text(json.dumps(data))
    return path


def _multipart(ctype: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    message = BytesParser(policy=default).parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + body)
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in message.iter_parts()}


def test_discord_and_raw_payloads(receiver, tmp_path):
    image = tmp_path / "sheet.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\nfake image bytes")
    hooks = Webhooks(load_webhook_config(_config(tmp_path, url=receiver.url, format="discord")), "my-run")
    hooks.send("info", "started")
    hooks.send("validation", "validation at step 5", step=5, images=[image])
    hooks.close()
    assert hooks.sent == 2 and hooks.failed == 0
    text = receiver.json_bodies()[0]
    assert text["content"].startswith("**my-run** [info]") and "started" in text["content"]
    parts = _multipart(*receiver.posts[1])
    payload = json.loads(parts["payload_json"][1])
    assert "step 5" in payload["content"] and payload["attachments"] == [{"id": 0, "filename": "sheet.png"}]
    assert parts["files[0]"] == ("sheet.png", image.read_bytes())

    receiver.posts.clear()
    raw = Webhooks(load_webhook_config(_config(tmp_path, url=receiver.url, format="raw", levels=["validation", "error"])),
                   "my-run")
    raw.send("info", "not wanted")  # level not subscribed
    raw.send("validation", "videos", step=5, images=[image])
    raw.error(RuntimeError("boom"), step=6)
    raw.close()
    bodies = receiver.json_bodies()
    assert [b["level"] for b in bodies] == ["validation", "error"]
    assert bodies[0]["step"] == 5 and base64.b64decode(bodies[0]["images"][0]["data_base64"]) == image.read_bytes()
    assert bodies[0]["images"][0]["content_type"] == "image/png"
    assert "RuntimeError: boom" in bodies[1]["message"] and bodies[1]["run"] == "my-run"


def test_progress_every_n_steps(receiver, tmp_path):
    hooks = Webhooks(load_webhook_config(_config(tmp_path, url=receiver.url, format="raw", progress_every_n_steps=2)), "r")
    for step in range(1, 6):
        hooks.progress(step, 5, {"step": step, "loss": 0.5})
    hooks.close()
    assert [(b["step"], b["fields"]["loss"]) for b in receiver.json_bodies()] == [(2, 0.5), (4, 0.5), (5, 0.5)]


def test_slow_or_broken_endpoints_never_block_or_raise(tmp_path, caplog):
    slow = Receiver(delay=1.5)
    try:
        hooks = Webhooks(load_webhook_config(_config(tmp_path, url=slow.url, format="raw")), "r")
        started = time.perf_counter()
        for i in range(5):
            hooks.send("info", f"message {i}")
        assert time.perf_counter() - started < 0.5  # queued, not sent inline
        hooks.close(timeout=0.1)  # gives up waiting; training does not hang on a slow endpoint
    finally:
        slow.close()
    failing = Receiver(status=500)
    try:
        hooks = Webhooks(load_webhook_config(_config(tmp_path, url=failing.url, format="discord")), "r")
        hooks.send("info", "a")
        hooks.send("info", "b")
        hooks.close()
        assert hooks.failed == 2 and hooks.sent == 0
    finally:
        failing.close()
    assert failing.url not in caplog.text  # a Discord URL is a secret
    hooks = Webhooks(load_webhook_config(_config(tmp_path, url="http://127.0.0.1:9/nothing", format="raw")), "r")
    hooks.send("info", "nobody listens")
    hooks.close()
    assert hooks.failed == 1


def test_bad_webhook_configs_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no such file"):
        load_webhook_config(tmp_path / "missing.json")
    with pytest.raises(UserError, match="no URL"):
        load_webhook_config(_config(tmp_path, format="raw"))
    with pytest.raises(UserError, match="unknown levels"):
        load_webhook_config(_config(tmp_path, url="http://x", levels=["progress", "debug"]))
    with pytest.raises(UserError, match="format"):
        load_webhook_config(_config(tmp_path, url="http://x", format="slack"))
    with pytest.raises(UserError, match="unknown keys"):
        load_webhook_config(_config(tmp_path, url="http://x", urls="typo"))
    monkeypatch.setenv("MY_HOOK", "http://from-env/hook")
    assert load_webhook_config(_config(tmp_path, url_env="MY_HOOK")).url == "http://from-env/hook"


def test_training_posts_progress_validation_and_errors(receiver, clips, tmp_path):
    hook = _config(tmp_path, url=receiver.url, format="raw", progress_every_n_steps=1)
    cfg = tiny_config(clips, tmp_path / "run", train={"max_train_steps": 2},
                      validation={"num_inference_steps": 2, "eval_every_n_steps": 0},
                      tracking={"webhook_config": str(hook)})
    train(cfg, show_progress=False)
    bodies = receiver.json_bodies()
    assert [(b["level"], b["step"]) for b in bodies] == [
        ("info", None), ("progress", 1), ("progress", 2), ("validation", 2), ("info", None)]
    assert bodies[0]["message"].startswith("started") and bodies[-1]["message"].startswith("finished after 2 steps")
    assert bodies[1]["fields"]["loss"] > 0 and bodies[1]["run"] == "run"
    sheet = tmp_path / "run" / "validation" / "step-2" / "contact_sheet.png"
    assert base64.b64decode(bodies[3]["images"][0]["data_base64"]) == sheet.read_bytes()

    receiver.posts.clear()

    def crash(step):
        raise RuntimeError("disk full")

    cfg = tiny_config(clips, tmp_path / "crash", train={"max_train_steps": 2}, validation={"at_end": False},
                      tracking={"webhook_config": str(hook)})
    with pytest.raises(RuntimeError, match="disk full"):
        train(cfg, show_progress=False, on_step=crash)
    last = receiver.json_bodies()[-1]
    assert last["level"] == "error" and "RuntimeError: disk full" in last["message"]
