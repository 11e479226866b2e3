"""A stand-in for the hub API on 127.0.0.1, with the endpoints huggingface_hub 2.4 calls to upload a folder.

create_repo (POST /api/repos/create), create_branch (POST /api/models/R/branch/B), README metadata
check (POST /api/validate-yaml), preupload (POST /api/models/R/preupload/REV, answered "regular" for
every file, so contents travel base64 in the commit, with no LFS or xet storage to stand in for) and
the commit (POST /api/models/R/commit/REV, NDJSON). Every request is recorded: method, path, headers,
body; committed files are decoded into `files[(repo, revision)][path] = bytes`.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self):
        self.requests: list[dict] = []
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}
        self.repos: dict[str, dict] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, value) -> None:
                body = json.dumps(value).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers), "body": b""})
                self._reply(404, {"error": "not found"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body})
                if not self.headers.get("Authorization", "").startswith("Bearer "):
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
                if parts[:3] == ["api", "repos", "create"]:
                    req = json.loads(body)
                    repo = f"{req.get('organization') or 'me'}/{req['name']}"
                    hub.repos[repo] = req
                    return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo, "id": "1"})
                if parts[:2] == ["api", "validate-yaml"]:
                    return self._reply(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    repo, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
                    if action == "branch":
                        return self._reply(200, {})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(
                            200,
                            {
                                "files": [
                                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                                ]
                            },
                        )
                    if action == "commit":
                        stored = hub.files.setdefault((repo, revision), {})
                        for line in body.splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                stored[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        host = self.headers["Host"]
                        return self._reply(
                            200,
                            {
                                "commitUrl": f"http://{host}/{repo}/commit/abc123",
                                "commitOid": "abc123",
                                "pullRequestUrl": None,
                            },
                        )
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
