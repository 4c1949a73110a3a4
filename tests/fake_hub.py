"""A local stand-in for the few Hugging Face Hub API calls a push makes (no machine here reaches the Hub): create a
repository, create a branch, validate a model card's metadata, ask how each file is uploaded (preupload), the LFS batch API with its basic transfer
(a PUT of the bytes, then a verify), and the commit (NDJSON). It keeps what arrived: the repositories, the
uploaded objects, every request, and each commit's files with their bytes (an LFS file's bytes from its upload).

Used with ``HF_ENDPOINT`` pointing at it and ``HF_HUB_DISABLE_XET`` set (the Hub's Xet transfer needs its own
storage service, which this does not imitate; files then go through LFS as they do where hf_xet is not installed).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading

import yaml
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Commit:
    repo: str
    branch: str
    summary: str
    files: dict[str, bytes]


@dataclass
class HubState:
    repos: dict[str, dict] = field(default_factory=dict)  # id -> {"visibility": ..., "branches": {name}}
    objects: dict[str, bytes] = field(default_factory=dict)  # LFS oid -> bytes
    commits: list[Commit] = field(default_factory=list)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)  # method, path, headers (names in lower case)
    cards: list[dict] = field(default_factory=list)  # the metadata of each README.md validated
    token: str | None = None  # when set, API calls without it are refused (401)
    fail_uploads_after: int | None = None  # refuse every LFS upload after this many (an upload failing midway)
    uploads: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeHub:
    """The server, on 127.0.0.1 and a free port, in a thread; ``url`` is its endpoint."""

    def __init__(self) -> None:
        self.state = HubState()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _reply(self, status: int, body: dict | None = None) -> None:
            data = json.dumps(body or {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _base(self) -> str:
            return f"http://{self.headers['Host']}"

        def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
            path = urlparse(self.path).path
            state.requests.append(("PUT", path, {k.lower(): v for k, v in self.headers.items()}))
            data = self._body()
            if not path.startswith("/lfs-upload/"):
                return self._reply(404, {"error": f"no route PUT {path}"})
            with state.lock:
                state.uploads += 1
                refuse = state.fail_uploads_after is not None and state.uploads > state.fail_uploads_after
            if refuse:
                return self._reply(400, {"error": "upload refused (injected failure)"})
            oid = path.rsplit("/", 1)[1]
            if hashlib.sha256(data).hexdigest() != oid:
                return self._reply(400, {"error": "sha256 does not match the oid"})
            state.objects[oid] = data
            self._reply(200)

        def do_POST(self) -> None:  # noqa: N802
            path = unquote(urlparse(self.path).path)
            state.requests.append(("POST", path, {k.lower(): v for k, v in self.headers.items()}))
            body = self._body()
            if state.token and path.startswith("/api/") and self.headers.get("Authorization") != f"Bearer {state.token}":
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
                url = {"url": f"{self._base()}/{repo}", "name": repo, "id": repo}
                if repo in state.repos:
                    return self._reply(409, {"error": "You already created this model repo", **url})
                visibility = payload.get("visibility") or ("private" if payload.get("private") else "public")
                state.repos[repo] = {"visibility": visibility, "branches": {"main"}}
                return self._reply(200, url)
            if path == "/api/validate-yaml":  # a README.md's metadata, checked before a commit that holds one
                content = json.loads(body)["content"]
                try:
                    meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
                except yaml.YAMLError as exc:
                    return self._reply(400, {"errors": [{"message": str(exc)}]})
                if not isinstance(meta, dict):
                    return self._reply(400, {"errors": [{"message": "the metadata is not a mapping"}]})
                state.cards.append(meta)
                return self._reply(200, {"warnings": []})
            if path == "/lfs-verify":
                return self._reply(200)
            if path.endswith(".git/info/lfs/objects/batch"):
                payload = json.loads(body)
                objects = []
                for obj in payload["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                    if obj["oid"] not in state.objects:
                        entry["actions"] = {"upload": {"href": f"{self._base()}/lfs-upload/{obj['oid']}"},
                                            "verify": {"href": f"{self._base()}/lfs-verify"}}
                    objects.append(entry)
                return self._reply(200, {"transfer": "basic", "objects": objects})
            parts = path.split("/")  # /api/models/ORG/NAME/{branch,preupload,commit}/REV
            if len(parts) >= 7 and parts[:3] == ["", "api", "models"]:
                repo, action, revision = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:])
                if repo not in state.repos:
                    return self._reply(404, {"error": f"Repository {repo} not found"})
                branches = state.repos[repo]["branches"]
                if action == "branch":
                    if revision in branches:
                        return self._reply(409, {"error": "Reference already exists"})
                    branches.add(revision)
                    return self._reply(200)
                if revision not in branches:
                    return self._reply(404, {"error": f"Revision {revision} not found"})
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["size"] > 1024 else "regular",
                         "shouldIgnore": False} for f in files]})
                if action == "commit":
                    return self._commit(repo, revision, body)
            self._reply(404, {"error": f"no route POST {path}"})

        def _commit(self, repo: str, branch: str, body: bytes) -> None:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {}
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in state.objects:
                        return self._reply(422, {"error": f"LFS object {value['oid']} of {value['path']} was never "
                                                          "uploaded"})
                    files[value["path"]] = state.objects[value["oid"]]
            state.commits.append(Commit(repo, branch, header["summary"], files))
            oid = hashlib.sha1(body).hexdigest()
            self._reply(200, {"commitUrl": f"{self._base()}/{repo}/commit/{oid}", "commitOid": oid,
                              "pullRequestUrl": None})

    return Handler
