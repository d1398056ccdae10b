"""A local HTTP server standing in for the Hugging Face Hub, for upload/download tests.

It implements just the endpoints huggingface_hub 2.4 uses for ``create_repo``, ``create_branch``,
``create_commit``/``upload_folder`` (README YAML validation, preupload, the legacy LFS batch +
PUT transfer, the NDJSON commit with inline base64 files) and for ``hf_hub_download``
(``HEAD``/``GET /{repo}/resolve/{rev}/{path}``, ``/api/models/{repo}[/revision/{rev}]``), and
stores every committed file on disk under ``root/repos/{namespace}/{name}/{revision}/``.

Point a client at it with ``HF_ENDPOINT=http://127.0.0.1:PORT`` set *before* huggingface_hub is
imported (it reads the variable at import), and ``HF_HUB_DISABLE_XET=1``: with ``hf_xet``
installed the client would otherwise send LFS files through the Xet CAS protocol, which this
stand-in does not speak.

Not a mock: real sockets, real HTTP, real bytes on disk. Each request is recorded in
``server.log`` as ``(method, path)`` so tests can assert what the client did (or that it did
nothing at all).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

# Like the Hub's default .gitattributes: these go through LFS, everything else inline.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.png", "*.zip", "*.gguf")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024


class HubStandin(ThreadingHTTPServer):
    """``with HubStandin(tmp_path, token="hf_test") as hub: ... hub.endpoint ...``"""

    daemon_threads = True

    def __init__(self, root: Path, token: str = "hf_test_token"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root)
        self.token = token
        self.log: list[tuple[str, str]] = []
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: commit_sha}}
        self.commits: list[dict] = []  # every commit: repo_id, revision, summary, files
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def repo_dir(self, repo_id: str, revision: str = "main") -> Path:
        return self.root / "repos" / repo_id / revision

    def __enter__(self):
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: HubStandin
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    # ---- helpers ----------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            return self.rfile.read(n)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None):
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message} if code else None)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.server.token}":
            return True
        self._error(401, "Invalid credentials in Authorization header")
        return False

    def _repo(self, repo_id: str) -> dict | None:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._error(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    # ---- routing ----------------------------------------------------------------------------
    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def do_POST(self):
        self._route()

    def do_PUT(self):
        self._route()

    def _route(self):
        path = unquote(urlsplit(self.path).path)
        with self.server.lock:
            self.server.log.append((self.command, path))
        parts = path.strip("/").split("/")
        try:
            if self.command == "POST" and path == "/api/repos/create":
                return self._create_repo()
            if self.command == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml()
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id = "/".join(parts[2:4])
                rest = parts[4:]
                if self.command == "POST" and rest[:1] == ["preupload"]:
                    return self._preupload(repo_id)
                if self.command == "POST" and rest[:1] == ["commit"]:
                    return self._commit(repo_id, "/".join(rest[1:]) or "main")
                if self.command == "POST" and rest[:1] == ["branch"]:
                    return self._create_branch(repo_id, "/".join(rest[1:]))
                if self.command == "GET" and (not rest or rest[0] == "revision"):
                    return self._model_info(repo_id, "/".join(rest[1:]) or "main")
            if len(parts) >= 3 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
                return self._lfs_batch(parts[0] + "/" + parts[1][: -len(".git")])
            if self.command == "PUT" and parts[0] == "lfs-upload":
                return self._lfs_put(parts[1])
            if self.command in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            self._error(404, f"stand-in Hub: no route for {self.command} {path}")
        except Exception as e:  # a bug in the stand-in must show up as a test failure, not a hang
            self._error(500, f"stand-in Hub error: {type(e).__name__}: {e}")

    # ---- write side -------------------------------------------------------------------------
    def _create_repo(self):
        if not self._authorized():
            return
        payload = json.loads(self._body())
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.server.endpoint}/{repo_id}"
        with self.server.lock:
            if repo_id in self.server.repos:
                # The real Hub names the existing repo's URL in the 409 body; create_repo(exist_ok=True) reads it.
                return self._json(409, {"error": "You already created this model repo", "url": url})
            private = payload.get("private", payload.get("visibility") == "private")
            self.server.repos[repo_id] = {"private": bool(private), "branches": {"main": _sha1(repo_id.encode())}}
            self.server.repo_dir(repo_id).mkdir(parents=True, exist_ok=True)
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self):
        content = json.loads(self._body())["content"]
        if content.startswith("---"):
            front = content.split("---", 2)[1]
            try:
                meta = yaml.safe_load(front)
            except yaml.YAMLError as e:
                return self._json(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
            if not isinstance(meta, dict):
                return self._json(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
        self._json(200, {"errors": [], "warnings": []})

    def _create_branch(self, repo_id: str, branch: str):
        if not self._authorized():
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        self._body()
        with self.server.lock:
            if branch in repo["branches"]:
                return self._error(409, f"Reference already exists: refs/heads/{branch}")
            repo["branches"][branch] = repo["branches"]["main"]
            src, dst = self.server.repo_dir(repo_id, "main"), self.server.repo_dir(repo_id, branch)
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.rglob("*"):
                if f.is_file():
                    (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                    (dst / f.relative_to(src)).write_bytes(f.read_bytes())
        self._json(200, {})

    def _preupload(self, repo_id: str):
        if not self._authorized() or self._repo(repo_id) is None:
            return
        files = json.loads(self._body())["files"]
        out = []
        for f in files:
            lfs = any(fnmatch.fnmatch(f["path"], p) for p in LFS_PATTERNS) or f["size"] > LFS_SIZE_THRESHOLD
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        self._json(200, {"files": out, "commitOid": "0" * 40})

    def _lfs_batch(self, repo_id: str):
        if not self._authorized() or self._repo(repo_id) is None:
            return
        payload = json.loads(self._body())
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not (self.server.root / "lfs" / obj["oid"]).is_file():
                entry["actions"] = {"upload": {"href": f"{self.server.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str):
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, f"sha256 mismatch for LFS object {oid}")
        blob = self.server.root / "lfs" / oid
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        self._send(200, b"", content_type="text/plain")

    def _commit(self, repo_id: str, revision: str):
        if not self._authorized():
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        if revision not in repo["branches"]:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = lines[0]
        assert header["key"] == "header", header
        staged: dict[str, bytes] = {}
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                assert value["encoding"] == "base64"
                staged[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                blob = self.server.root / "lfs" / value["oid"]
                if not blob.is_file():
                    return self._error(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                staged[value["path"]] = blob.read_bytes()
            else:
                return self._error(400, f"stand-in Hub: unsupported commit operation {item['key']}")
        target = self.server.repo_dir(repo_id, revision)
        with self.server.lock:
            for rel, data in staged.items():
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
            sha = _sha1(json.dumps([repo["branches"][revision], sorted(staged)]).encode())
            repo["branches"][revision] = sha
            self.server.commits.append(
                {"repo_id": repo_id, "revision": revision, "summary": header["value"]["summary"],
                 "files": sorted(staged), "oid": sha}
            )
        self._json(200, {"commitUrl": f"{self.server.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": None, "success": True})

    # ---- read side (hf_hub_download / from_pretrained) --------------------------------------
    @staticmethod
    def _branch_of(repo: dict, revision: str) -> str | None:
        """A branch name, or a commit sha that is some branch's head (clients pin the sha they saw)."""
        if revision in repo["branches"]:
            return revision
        return next((b for b, sha in repo["branches"].items() if sha == revision), None)

    def _readable(self, repo_id: str) -> dict | None:
        repo = self.server.repos.get(repo_id)
        if repo is None or (repo["private"] and self.headers.get("Authorization") != f"Bearer {self.server.token}"):
            self._error(404, f"Repository not found: {repo_id}", "RepoNotFound")
            return None
        return repo

    def _model_info(self, repo_id: str, revision: str):
        repo = self._readable(repo_id)
        if repo is None:
            return
        branch = self._branch_of(repo, revision)
        if branch is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        base = self.server.repo_dir(repo_id, branch)
        siblings = [{"rfilename": f.relative_to(base).as_posix()} for f in sorted(base.rglob("*")) if f.is_file()]
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": repo["branches"][branch],
                         "private": repo["private"], "siblings": siblings, "tags": []})

    def _resolve(self, repo_id: str, revision: str, rel: str):
        repo = self._readable(repo_id)
        if repo is None:
            return
        branch = self._branch_of(repo, revision)
        if branch is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        f = self.server.repo_dir(repo_id, branch) / rel
        if not f.is_file():
            return self._error(404, f"Entry not found: {rel}", "EntryNotFound")
        data = f.read_bytes()
        etag = hashlib.sha256(data).hexdigest()
        self._send(200, data, {"X-Repo-Commit": repo["branches"][branch], "ETag": f'"{etag}"'},
                   content_type="application/octet-stream")


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


if __name__ == "__main__":  # manual use: python tests/hub_standin.py ROOT
    import sys
    import time

    with HubStandin(Path(sys.argv[1] if len(sys.argv) > 1 else "hub-standin")) as hub:
        print(f"HF_ENDPOINT={hub.endpoint} HF_HUB_DISABLE_XET=1 HF_TOKEN={hub.token}", flush=True)
        while True:
            time.sleep(3600)
