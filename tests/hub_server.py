"""A local stand-in for the Hub's upload endpoints (create repo, preupload, commit), recording every request and
rebuilding the repo's files from the commits, so tests can run the real huggingface_hub upload code offline."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeHub:
    def __init__(self, fail_commits: bool = False):
        self.owner = "user"  # whose token the tests use (create_repo without a namespace lands here too)
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        self.files: dict[str, dict[str, bytes]] = {}  # repo -> path -> content
        self.commits: list[tuple[str, str]] = []  # (repo, message)
        self.validated: list[str] = []  # README.md texts sent for metadata validation
        self.fail_commits = fail_commits
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(("POST", self.path, dict(self.headers)))
                parts = self.path.split("?")[0].strip("/").split("/")
                if self.path.startswith("/api/repos/create"):
                    name = json.loads(body)
                    repo = f"{name.get('organization') or 'user'}/{name['name']}"
                    hub.files.setdefault(repo, {})
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if self.path.startswith("/api/validate-yaml"):  # the client checks README.md metadata before committing
                    hub.validated.append(json.loads(body)["content"])
                    return self._reply(200, {"errors": [], "warnings": []})
                if len(parts) >= 5 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                       for f in files]})
                if len(parts) >= 5 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                    if hub.fail_commits:
                        return self._reply(403, {"error": "this token cannot write to the repo"})
                    repo = f"{parts[2]}/{parts[3]}"
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            hub.commits.append((repo, item["value"]["summary"]))
                        elif item["key"] == "file":
                            value = item["value"]
                            hub.files.setdefault(repo, {})[value["path"]] = base64.b64decode(value["content"])
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/" + "0" * 40, "commitOid": "0" * 40})
                return self._reply(404, {"error": f"no fake for {self.path}"})

            def do_GET(self):
                hub.requests.append(("GET", self.path, dict(self.headers)))
                if self.path.startswith("/api/whoami-v2"):  # the token's owner (a bare repo name lands there)
                    if not self.headers.get("Authorization"):
                        return self._reply(401, {"error": "no token"})
                    return self._reply(200, {"type": "user", "name": hub.owner, "orgs": []})
                return self._reply(404, {"error": f"no fake for {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def write_repo(self, repo: str, target: Path) -> Path:
        for path, data in self.files.get(repo, {}).items():
            (target / path).parent.mkdir(parents=True, exist_ok=True)
            (target / path).write_bytes(data)
        return target
