"""A loopback Hugging Face Hub for tests: serves on 127.0.0.1 (port 0) the HTTP calls that the installed
``huggingface_hub`` client makes for ``create_repo``, ``upload_folder`` / ``create_commit`` (README YAML
validation, ``preupload``, the git-LFS batch API with "basic" transfers, and the NDJSON ``commit``),
``file_exists``, ``hf_hub_download`` (HEAD and GET on ``/resolve``, with Range) and ``model_info``.

Modelled on the client's code (``huggingface_hub/hf_api.py``, ``_commit_api.py``, ``lfs.py``,
``file_download.py``, ``utils/_http.py``): the headers it reads (``X-Repo-Commit``, ``ETag``,
``X-Linked-Etag``, ``X-Linked-Size``, ``X-Error-Code``) and the JSON fields it validates. Xet storage is not
served: clients must run with ``HF_HUB_DISABLE_XET=1`` (see :func:`client_settings`), which makes them
upload large files through git-LFS as they do without ``hf_xet``.

Bounded: request bodies are capped, the number of requests is capped, and the server shuts itself down
after ``lifetime`` seconds even if nobody stops it.

    with LocalHub(tokens={"hf_test": "alice"}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url  # or patch huggingface_hub.constants, see client_settings()
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".tar", ".ckpt", ".onnx", ".h5", ".msgpack", ".npz", ".zip")
LFS_THRESHOLD = 10 * 2 ** 20  # the Hub stores larger files in LFS whatever their name
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Blob:
    content: bytes
    lfs: bool

    @property
    def oid(self) -> str:  # what the Hub reports: sha256 for LFS files, the git blob sha1 otherwise
        return hashlib.sha256(self.content).hexdigest() if self.lfs else git_blob_sha1(self.content)


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    message: str
    files: Dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: Dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid
    commits: Dict[str, Commit] = field(default_factory=dict)
    prs: int = 0

    def resolve(self, revision: str) -> Optional[Commit]:
        oid = self.refs.get(revision, revision)
        return self.commits.get(oid)

    def history(self, revision: str = "main") -> List[Commit]:
        commit, out = self.resolve(revision), []
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out


class HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None,
                 body: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = body or {}


class LocalHub:
    """The loopback Hub. Use as a context manager; ``url`` is its ``HF_ENDPOINT``."""

    def __init__(self, tokens: Optional[Dict[str, str]] = None, *, lifetime: float = 300.0,
                 max_body: int = 256 * 2 ** 20, max_requests: int = 5000):
        self.tokens = dict(tokens or {})  # token -> user name
        self.lifetime, self.max_body, self.max_requests = lifetime, max_body, max_requests
        self.repos: Dict[str, Repo] = {}
        self.lfs: Dict[str, bytes] = {}
        self.upload_tickets: Dict[str, str] = {}  # one-time signature -> LFS oid it may upload
        self.requests: List[Tuple[str, str, bool]] = []  # (method, path, sent a valid token)
        self.lock = threading.RLock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._threads: List[threading.Thread] = []
        self._stopped = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> "LocalHub":
        hub = self

        class Handler(_Handler):
            pass
        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        serve = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                 name="local-hub", daemon=True)
        watchdog = threading.Thread(target=self._watchdog, name="local-hub-watchdog", daemon=True)
        self._threads = [serve, watchdog]
        serve.start()
        watchdog.start()
        return self

    def _watchdog(self) -> None:
        if not self._stopped.wait(self.lifetime):
            self.stop()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- test helpers ------------------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> Dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        return {path: blob.content for path, blob in commit.files.items()}

    def commits(self, repo_id: str, revision: str = "main") -> List[Commit]:
        return self.repos[repo_id].history(revision)

    # -- the Hub -----------------------------------------------------------------------------------------
    def user(self, auth: Optional[str]) -> Optional[str]:
        if auth and auth.lower().startswith("bearer "):
            return self.tokens.get(auth[7:].strip())
        return None

    def require_user(self, auth: Optional[str]) -> str:
        user = self.user(auth)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def repo(self, repo_id: str, auth: Optional[str], *, write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        user = self.user(auth)
        if repo is None or (repo.private and user is None) or (write and user is None):
            raise HubError(404 if user else 401, "Repository not found", "RepoNotFound")
        if write and repo_id.split("/")[0] != user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def commit(self, repo: Repo, base: str, message: str, files: Dict[str, Blob], create_pr: bool) -> Tuple[str, Optional[str]]:
        parent = repo.resolve(base)
        if parent is None:
            raise HubError(404, f"Invalid rev id: {base}", "RevisionNotFound")
        oid = hashlib.sha1(f"{repo.repo_id}{parent.oid}{message}{time.time_ns()}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent.oid, message, files)
        if create_pr:
            repo.prs += 1
            ref = f"refs/pr/{repo.prs}"
            repo.refs[ref] = oid
            return oid, ref
        repo.refs[base] = oid
        return oid, None


def _lfs_mode(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size > LFS_THRESHOLD


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1"

    def log_message(self, format, *args):  # keep test output clean
        pass

    # -- plumbing ----------------------------------------------------------------------------------------
    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        auth = self.headers.get("Authorization")
        with hub.lock:
            hub.requests.append((method, path, hub.user(auth) is not None))
            over = len(hub.requests) > hub.max_requests
        try:
            try:
                body = self._body() if method in ("POST", "PUT") else b""
            except HubError:
                self.close_connection = True  # the rest of the body is still on the wire
                raise
            if over:
                raise HubError(429, "request limit of this test Hub reached")
            status, headers, payload = self._route(method, path, query, auth, body)
        except HubError as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message
            status, payload = e.status, json.dumps({"error": e.message, **e.body}).encode()
            headers.setdefault("Content-Type", "application/json")
        self.send_response(status)
        length = headers.pop("Content-Length", None)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length if length is not None else len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > self.hub.max_body:
                    raise HubError(413, "request body too large for this test Hub")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body:
            raise HubError(413, "request body too large for this test Hub")
        return self.rfile.read(length)

    @staticmethod
    def _json(status: int, value) -> Tuple[int, Dict[str, str], bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(value).encode()

    # -- routes ------------------------------------------------------------------------------------------
    def _route(self, method, path, query, auth, body):
        hub = self.hub
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)", path)
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"), auth)
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}"))
        if method == "GET" and path == "/api/whoami-v2":
            user = hub.require_user(auth)
            return self._json(200, {"type": "user", "name": user, "orgs": [], "auth": {"type": "access_token"}})
        if method == "POST" and m:
            repo = hub.repo(unquote(m.group(1)), auth, write=True)
            revision = unquote(m.group(3))
            create_pr = query.get("create_pr") == ["1"]
            if m.group(2) == "preupload":
                return self._preupload(repo, revision, json.loads(body))
            return self._commit(repo, revision, body, create_pr)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/(.+))?", path)
        if method == "GET" and m:
            return self._model_info(hub.repo(unquote(m.group(1)), auth), unquote(m.group(2) or "main"))
        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if method == "POST" and m:
            hub.repo(unquote(m.group(1)), auth, write=True)
            return self._lfs_batch(json.loads(body))
        m = re.fullmatch(r"/_lfs/([0-9a-f]{64})(/verify)?", path)
        if m and method == "PUT" and not m.group(2):
            return self._lfs_put(m.group(1), query.get("sig", [""])[0], body)
        if m and method == "POST" and m.group(2):
            return self._lfs_verify(m.group(1), json.loads(body))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if method in ("HEAD", "GET") and m:
            return self._resolve(method, unquote(m.group(1)), unquote(m.group(2)), unquote(m.group(3)), auth)
        raise HubError(404, f"{method} {path} is not served by this test Hub")

    def _create_repo(self, payload, auth):
        hub = self.hub
        user = hub.require_user(auth)
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "this test Hub serves model repositories only")
        namespace = payload.get("organization") or user
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace}")
        name = payload.get("name") or ""
        if not re.fullmatch(r"[\w.-]+", name):
            raise HubError(400, f"invalid repository name {name!r}")
        repo_id = f"{namespace}/{name}"
        url = f"{self._base()}/{repo_id}"
        with hub.lock:
            if repo_id in hub.repos:
                raise HubError(409, "You already created this model repo", body={"url": url})
            repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
            initial = hashlib.sha1(f"{repo_id}{time.time_ns()}".encode()).hexdigest()
            repo.commits[initial] = Commit(initial, None, "initial commit",
                                           {".gitattributes": Blob(GITATTRIBUTES, lfs=False)})
            repo.refs["main"] = initial
            hub.repos[repo_id] = repo
        return self._json(200, {"url": url, "name": repo_id, "id": secrets.token_hex(12)})

    def _validate_yaml(self, payload):
        content = payload.get("content", "")
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        errors = []
        if m:
            try:
                meta = yaml.safe_load(m.group(1))
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        warnings = [] if m else [{"message": "empty or missing yaml metadata in repo card"}]
        return self._json(400 if errors else 200, {"errors": errors, "warnings": warnings})

    def _preupload(self, repo, revision, payload):
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = []
        for item in payload.get("files", []):
            existing = commit.files.get(item["path"])
            files.append({
                "path": item["path"],
                "uploadMode": "lfs" if _lfs_mode(item["path"], int(item["size"])) else "regular",
                "shouldIgnore": False,
                "oid": existing.oid if existing else None,
            })
        return self._json(200, {"files": files, "commitOid": commit.oid})

    def _lfs_batch(self, payload):
        hub = self.hub
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "only 'upload' with the 'basic' transfer is served")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry = {"oid": oid, "size": size, "authenticated": True}
            if size > hub.max_body:
                entry["error"] = {"code": 422, "message": f"object of {size} bytes exceeds this test Hub's limit"}
            elif oid not in hub.lfs:
                signature = secrets.token_urlsafe(16)
                with hub.lock:
                    hub.upload_tickets[signature] = oid
                entry["actions"] = {
                    "upload": {"href": f"{self._base()}/_lfs/{oid}?sig={signature}"},
                    "verify": {"href": f"{self._base()}/_lfs/{oid}/verify"},
                }
            objects.append(entry)
        return self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, oid, signature, body):
        hub = self.hub
        with hub.lock:
            if hub.upload_tickets.pop(signature, None) != oid:
                raise HubError(403, "invalid or used upload signature")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256 oid")
        with hub.lock:
            hub.lfs[oid] = body
        return 200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, b""

    def _lfs_verify(self, oid, payload):
        content = self.hub.lfs.get(oid)
        if content is None or len(content) != int(payload.get("size", -1)):
            raise HubError(404, f"object {oid} was not uploaded")
        return self._json(200, {"success": True})

    def _commit(self, repo, revision, body, create_pr):
        hub = self.hub
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        with hub.lock:
            base = repo.resolve(revision)
            if base is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if header.get("parentCommit") and header["parentCommit"] != base.oid:
                raise HubError(412, "parentCommit is not the head of the branch")
            files = dict(base.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, "only base64 file contents are served")
                    files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    content = hub.lfs.get(value["oid"])
                    if content is None:
                        raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    files[value["path"]] = Blob(content, lfs=True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
            oid, pr_ref = hub.commit(repo, revision, header.get("summary") or "", files, create_pr)
        result = {"success": True, "commitOid": oid, "commitUrl": f"{self._base()}/{repo.repo_id}/commit/{oid}",
                  "commitMessage": header.get("summary")}
        if pr_ref:
            result["pullRequestUrl"] = f"{self._base()}/{repo.repo_id}/discussions/{pr_ref.rsplit('/', 1)[-1]}"
        return self._json(200, result)

    def _model_info(self, repo, revision):
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self._json(200, {
            "_id": secrets.token_hex(12), "id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.oid,
            "private": repo.private, "disabled": False, "gated": False, "tags": [], "downloads": 0, "likes": 0,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        })

    def _resolve(self, method, repo_id, revision, filename, auth):
        repo = self.hub.repo(repo_id, auth)
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        blob = commit.files.get(filename)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        content = blob.content
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.oid}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.oid}"', "X-Linked-Size": str(len(content))})
        status = 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m and method == "GET":
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start:end + 1], 206
        headers["Content-Length"] = str(len(content))
        return status, headers, content if method == "GET" else b""

    def _base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"


def client_settings(hub: LocalHub, cache_dir: str) -> Dict[str, object]:
    """``huggingface_hub.constants`` values that point an already imported client at ``hub``."""
    return {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_CACHE": cache_dir,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }


def client_environment(hub: LocalHub, home: str, token: Optional[str] = None) -> Dict[str, str]:
    """Environment variables that point a new process's client at ``hub``."""
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": home, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    if token:
        env["HF_TOKEN"] = token
    return env


__all__ = ["LocalHub", "client_settings", "client_environment", "git_blob_sha1"]
