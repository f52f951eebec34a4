"""A local stand-in for the Hub's endpoints (create repo, preupload, commit; repo info, tree, paths-info, resolve),
recording every request and rebuilding the repo's files from the commits, so tests (and the GPU rehearsal,
`python tests/hub_server.py`) run the real huggingface_hub upload and download code offline.

Failure modes: `fail_commits` refuses every commit (403, a read-only token); `fail_first` answers that many commits
with 500 before it accepts them (a flaky Hub); `drop_files` accepts commits but stores nothing (the listing back is
wrong); `deny_reads` answers every read with 401 (an output the token cannot see)."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import threading
import time
from urllib.parse import parse_qs, unquote
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeHub:
    def __init__(self, fail_commits: bool = False, fail_first: int = 0, drop_files: bool = False,
                 deny_reads: bool = False, host: str = "127.0.0.1", port: int = 0):
        self.owner = "user"  # whose token the tests use (create_repo without a namespace lands here too)
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        self.files: dict[str, dict[str, bytes]] = {}  # repo -> path -> content
        self.commits: list[tuple[str, str]] = []  # (repo, message)
        self.refused = 0  # commits answered with an error
        self.validated: list[str] = []  # README.md texts sent for metadata validation
        self.fail_commits, self.fail_first, self.drop_files, self.deny_reads = fail_commits, fail_first, drop_files, deny_reads
        self.lock = threading.Lock()
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
                    with hub.lock:
                        if hub.fail_commits or hub.refused < hub.fail_first:
                            hub.refused += 1
                            code = 403 if hub.fail_commits else 500
                            return self._reply(code, {"error": "this token cannot write to the repo" if code == 403
                                                       else "internal error, try again"})
                        repo = f"{parts[2]}/{parts[3]}"
                        for line in body.decode().splitlines():
                            item = json.loads(line)
                            if item["key"] == "header":
                                hub.commits.append((repo, item["value"]["summary"]))
                            elif item["key"] == "file" and not hub.drop_files:
                                value = item["value"]
                                hub.files.setdefault(repo, {})[value["path"]] = base64.b64decode(value["content"])
                            elif item["key"] == "deletedFolder" and not hub.drop_files:
                                folder = item["value"]["path"].rstrip("/") + "/"
                                for path in [p for p in hub.files.get(repo, {}) if p.startswith(folder)]:
                                    del hub.files[repo][path]
                            elif item["key"] == "deletedFile" and not hub.drop_files:
                                hub.files.get(repo, {}).pop(item["value"]["path"], None)
                        return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{hub.sha}", "commitOid": hub.sha})
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "paths-info":
                    if hub.deny_reads:
                        return self._reply(401, {"error": "Invalid credentials"})
                    repo, wanted = f"{parts[2]}/{parts[3]}", parse_qs(body.decode()).get("paths", [])
                    files = hub.files.get(repo, {})
                    return self._reply(200, [hub.entry(p, files[p]) for p in wanted if p in files])
                return self._reply(404, {"error": f"no fake for {self.path}"})

            def _read(self, head: bool):
                hub.requests.append(("HEAD" if head else "GET", self.path, dict(self.headers)))
                path, _, query = self.path.partition("?")
                parts = [unquote(p) for p in path.strip("/").split("/")]
                if hub.deny_reads:
                    return self._reply(401, {"error": "Invalid credentials"})
                if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                    repo = f"{parts[2]}/{parts[3]}"
                    if repo not in hub.files:
                        self.send_response(404)
                        self.send_header("X-Error-Code", "RepoNotFound")
                        self.send_header("Content-Length", "0")
                        return self.end_headers()
                    files = hub.files[repo]
                    if len(parts) == 4 or parts[4] == "revision":
                        return self._reply(200, {"id": repo, "sha": hub.sha, "private": True,
                                                 "siblings": [{"rfilename": p} for p in sorted(files)]})
                    if parts[4] == "tree":
                        under = "/".join(parts[6:])
                        return self._reply(200, [hub.entry(p, data) for p, data in sorted(files.items())
                                                 if not under or p.startswith(under.rstrip("/") + "/")])
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, name = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
                    data = hub.files.get(repo, {}).get(name)
                    if data is None:
                        self.send_response(404)
                        self.send_header("X-Error-Code", "EntryNotFound")
                        self.send_header("Content-Length", "0")
                        return self.end_headers()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                    self.send_header("X-Repo-Commit", hub.sha)
                    self.end_headers()
                    if not head:
                        self.wfile.write(data)
                    return None
                return self._reply(404, {"error": f"no fake for {self.path}"})

            def do_GET(self):
                if self.path.startswith("/api/whoami-v2"):  # the token's owner (a bare repo name lands there)
                    hub.requests.append(("GET", self.path, dict(self.headers)))
                    if not self.headers.get("Authorization"):
                        return self._reply(401, {"error": "no token"})
                    return self._reply(200, {"type": "user", "name": hub.owner, "orgs": []})
                return self._read(head=False)

            def do_HEAD(self):
                return self._read(head=True)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
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

    @property
    def sha(self) -> str:
        """The repo head: changes with every accepted commit (what snapshot_download keys its cache on)."""
        return hashlib.sha1(str(len(self.commits)).encode()).hexdigest()

    @staticmethod
    def entry(path: str, data: bytes) -> dict:
        return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}


if __name__ == "__main__":  # the GPU rehearsal: `python tests/hub_server.py PORT` serves until killed
    with FakeHub(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0) as served:
        print(f"fake Hub at {served.url}", flush=True)
        while True:
            time.sleep(3600)
