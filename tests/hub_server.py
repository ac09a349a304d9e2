"""A local stand-in for the few Hugging Face Hub endpoints an upload uses (whoami, create repo, validate-yaml,
preupload, commit), answering as the Hub does, so that the real `huggingface_hub` client uploads a run in a test
(the Hub itself cannot be reached from where the tests run): every file is taken as a regular (inline, base64)
file and written under `root/<repo id>/`. `refuse_token`: whoami answers 401; `fail_commits`: commits answer 403."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HubStandIn:
    def __init__(self, root: Path, refuse_token: bool = False, fail_commits: bool = False):
        self.root, self.refuse_token, self.fail_commits = root, refuse_token, fail_commits
        self.repos: dict[str, dict] = {}  # repo id -> the create request's body
        self.commits: list[dict] = []  # each commit's header
        self.cards: list[str] = []  # the README.md texts validated
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # (quiet)
                pass

            def reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                if "error" in body:
                    self.send_header("X-Error-Message", body["error"])
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.startswith("/api/whoami-v2"):
                    if hub.refuse_token:
                        return self.reply(401, {"error": "Invalid credentials in Authorization header"})
                    return self.reply(200, {"type": "user", "name": "me", "orgs": []})
                self.reply(404, {"error": f"not here: {self.path}"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo = f"{request.get('organization') or 'me'}/{request['name']}"
                    hub.repos[repo] = request
                    return self.reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if path == "/api/validate-yaml":  # (a README.md's metadata)
                    hub.cards.append(json.loads(body)["content"])
                    return self.reply(200, {"errors": [], "warnings": []})
                if path.startswith("/api/models/") and "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False, "oid": None} for f in files]})
                if path.startswith("/api/models/") and "/commit/" in path:
                    if hub.fail_commits:  # (as for a repo the token may read but not write)
                        return self.reply(403, {"error": "You don't have the rights to write to this repo"})
                    repo = path[len("/api/models/"):].split("/commit/")[0]
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            hub.commits.append(item["value"])
                        elif item["key"] == "file":
                            target = hub.root / repo / item["value"]["path"]
                            target.parent.mkdir(parents=True, exist_ok=True)
                            target.write_bytes(base64.b64decode(item["value"]["content"]))
                    return self.reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/1", "commitOid": "1" * 40,
                                            "pullRequestUrl": None})
                self.reply(404, {"error": f"not here: {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
