"""A local stand-in for the Hugging Face Hub: the HTTP calls that huggingface_hub's upload path makes.

It answers whoami, repo creation, branches, the file tree, repo info, README metadata validation, preupload,
the Git LFS batch API (basic and multipart transfers, with verify) and the ndjson commit API, and it keeps
the files it receives in memory so that tests can check what arrived. It speaks LFS only, not Xet: tests
that use it turn Xet off (see docs/push.md). Failures can be injected per request to test resumption.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".png", ".pt")
REGULAR_MAX = 10 * 2**20  # the Hub stores bigger files through LFS whatever their type
MULTIPART_ABOVE = 256 * 1024  # objects above this size get a multipart upload (the Hub's threshold is larger)
PART_SIZE = 128 * 1024
GITATTRIBUTES = (
    b"*.gguf filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    """One file of a commit: regular content, or a pointer to an LFS object."""

    size: int
    sha256: str
    lfs: bool
    content: bytes = b""  # regular files only

    def pointer(self) -> bytes:
        spec = "version https://git-lfs.github.com/spec/v1"
        return f"{spec}\noid sha256:{self.sha256}\nsize {self.size}\n".encode()


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict] = field(default_factory=dict)  # oid -> {"parent", "summary", "tree"}

    def tree(self, branch: str) -> dict[str, StoredFile]:
        return self.commits[self.branches[branch]]["tree"]


@dataclass
class Failure:
    method: str
    pattern: str
    status: int
    times: int


class FakeHub:
    """State of the stand-in: tokens, repos, LFS objects, the requests seen and failures to inject."""

    def __init__(self, user: str = "alice") -> None:
        self.user = user
        self.token = ""  # the write token tests hand to huggingface_hub
        self.tokens: dict[str, str] = {}  # token -> role (write | read)
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, bytes] = {}  # LFS store: sha256 -> content
        self.parts: dict[str, dict[int, bytes]] = {}
        self.requests: list[tuple[str, str]] = []
        self.failures: list[Failure] = []
        self.lock = threading.Lock()
        self.url = ""

    # --- what tests use -------------------------------------------------------------------------------
    def fail(self, method: str, pattern: str, status: int, times: int = 1) -> None:
        """Answer the next `times` requests of `method` whose path matches `pattern` with `status`."""
        self.failures.append(Failure(method, pattern, status, times))

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        """Every file on a branch with its full content (LFS objects resolved)."""
        tree = self.repos[repo_id].tree(branch)
        return {p: (self.objects[f.sha256] if f.lfs else f.content) for p, f in tree.items()}

    def lfs_paths(self, repo_id: str, branch: str = "main") -> set[str]:
        return {p for p, f in self.repos[repo_id].tree(branch).items() if f.lfs}

    def commit_count(self, repo_id: str) -> int:
        return len(self.repos[repo_id].commits)

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def count(self, method: str, pattern: str) -> int:
        return sum(1 for m, p in self.requests if m == method and re.search(pattern, p))

    # --- state changes --------------------------------------------------------------------------------
    def _commit(self, repo: Repo, branch: str | None, tree: dict[str, StoredFile], summary: str) -> str:
        parent = repo.branches.get(branch) if branch else None
        listing = sorted((p, f.sha256, f.lfs) for p, f in tree.items())
        oid = hashlib.sha1(json.dumps([parent, summary, listing, len(repo.commits)]).encode()).hexdigest()
        repo.commits[oid] = {"parent": parent, "summary": summary, "tree": tree}
        if branch:
            repo.branches[branch] = oid
        return oid

    def create_repo(self, repo_id: str, private: bool) -> None:
        repo = Repo(private=private)
        gitattributes = StoredFile(
            len(GITATTRIBUTES), hashlib.sha256(GITATTRIBUTES).hexdigest(), False, GITATTRIBUTES
        )
        self._commit(repo, "main", {".gitattributes": gitattributes}, "initial commit")
        self.repos[repo_id] = repo


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small header and body writes would otherwise wait on delayed ACKs
    hub: FakeHub  # set on the subclass made per server

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        return

    # --- plumbing -------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: object = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _role(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return self.hub.tokens.get(auth[len("Bearer ") :]) if auth.startswith("Bearer ") else None

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        body = self._body()
        hub = self.hub
        with hub.lock:
            hub.requests.append((method, path))
            for failure in hub.failures:
                if failure.times > 0 and failure.method == method and re.search(failure.pattern, path):
                    failure.times -= 1
                    return self._error(failure.status, "injected failure")
        for route_method, pattern, handler, needs in ROUTES:
            match = re.fullmatch(pattern, path)
            if route_method != method or not match:
                continue
            if needs:
                role = self._role()
                if role is None:
                    return self._error(401, "Invalid credentials in Authorization header")
                if needs == "write" and role != "write":
                    return self._error(403, "You don't have the rights to write to this repository")
            with hub.lock:
                groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                return handler(self, body=body, query=query, **groups)
        self._error(404, f"no route for {method} {path}")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    # --- API ------------------------------------------------------------------------------------------
    def _repo(self, repo_id: str, branch: str | None = None) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        if branch is not None and branch not in repo.branches:
            self._error(404, "Invalid rev id", "RevisionNotFound")
            return None
        return repo

    def whoami(self, body: bytes, query: dict) -> None:
        self._send(200, {"type": "user", "name": self.hub.user, "orgs": [], "auth": {"type": "access_token"}})

    def create_repo(self, body: bytes, query: dict) -> None:
        request = json.loads(body)
        namespace = request.get("organization") or self.hub.user
        repo_id = f"{namespace}/{request['name']}"
        if namespace != self.hub.user:
            return self._error(
                403, f"You don't have the rights to create a model under the namespace {namespace}"
            )
        if repo_id in self.hub.repos:  # the Hub's 409 still carries the url, which huggingface_hub reads
            message = "You already created this model repo"
            url = f"{self.hub.url}/{repo_id}"
            return self._send(409, {"error": message, "url": url}, {"X-Error-Message": message})
        self.hub.create_repo(repo_id, request.get("visibility") == "private")
        self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def create_branch(self, body: bytes, query: dict, repo: str, rev: str) -> None:
        found = self._repo(repo)
        if found is None:
            return None
        if rev in found.branches:
            return self._error(409, "Reference already exists")
        start = (json.loads(body or b"{}").get("startingPoint")) or "main"
        found.branches[rev] = found.branches.get(start, start)
        self._send(200, {})

    def tree(self, body: bytes, query: dict, repo: str, rev: str, sub: str | None = None) -> None:
        found = self._repo(repo, rev)
        if found is None:
            return None
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        prefix = f"{sub.strip('/')}/" if sub else ""
        entries, folders = [], set()
        for path, f in sorted(found.tree(rev).items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :].split("/")
            for depth in range(1, len(rest)):
                folders.add(prefix + "/".join(rest[:depth]))
            if len(rest) > 1 and not recursive:
                continue
            entry = {"type": "file", "path": path, "size": f.size}
            if f.lfs:
                pointer = f.pointer()
                entry["oid"] = git_blob_sha1(pointer)
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(pointer)}
            else:
                entry["oid"] = git_blob_sha1(f.content)
            entries.append(entry)
        if not recursive:
            folders = {d for d in folders if "/" not in d[len(prefix) :]}
        entries += [
            {"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in folders
        ]
        self._send(200, entries)

    def revision(self, body: bytes, query: dict, repo: str, rev: str = "main") -> None:
        found = self._repo(repo, rev)
        if found is None:
            return None
        siblings = [{"rfilename": p} for p in sorted(found.tree(rev))]
        self._send(
            200, {"id": repo, "sha": found.branches[rev], "private": found.private, "siblings": siblings}
        )

    def validate_yaml(self, body: bytes, query: dict) -> None:
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as exc:
            return self._send(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
        problems = []
        if not isinstance(metadata, dict):
            problems.append("metadata must be a mapping")
        elif not all(isinstance(t, str) for t in metadata.get("tags", [])):
            problems.append("tags must be strings")
        if problems:
            return self._send(400, {"errors": [{"message": m} for m in problems]})
        self._send(200, {"errors": [], "warnings": []})

    def preupload(self, body: bytes, query: dict, repo: str, rev: str) -> None:
        found = self._repo(repo, rev)
        if found is None:
            return None
        tree = found.tree(rev)
        answer = []
        for item in json.loads(body)["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = item["path"].endswith(LFS_SUFFIXES) or b"\0" in sample or item["size"] > REGULAR_MAX
            remote = tree.get(item["path"])
            oid = None if remote is None else (remote.sha256 if remote.lfs else git_blob_sha1(remote.content))
            answer.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        self._send(200, {"files": answer})

    def lfs_batch(self, body: bytes, query: dict, repo: str) -> None:
        if self._repo(repo) is None:
            return None
        request = json.loads(body)
        objects = []
        for obj in request["objects"]:
            oid, size = obj["oid"], obj["size"]
            answer: dict = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.objects:  # stored objects get no actions: the client skips them
                href = f"{self.hub.url}/lfs/{oid}"
                header: dict[str, str] = {}
                if size > MULTIPART_ABOVE:
                    parts = -(-size // PART_SIZE)
                    header = {"chunk_size": str(PART_SIZE)}
                    header.update({f"{n:05d}": f"{href}/part/{n}" for n in range(1, parts + 1)})
                answer["actions"] = {
                    "upload": {"href": href, "header": header},
                    "verify": {"href": f"{href}/verify"},
                }
            objects.append(answer)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _store(self, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "content does not match its sha256")
        self.hub.objects[oid] = data
        self._send(200, {})

    def lfs_put(self, body: bytes, query: dict, oid: str) -> None:
        self._store(oid, body)

    def lfs_part(self, body: bytes, query: dict, oid: str, n: str) -> None:
        self.hub.parts.setdefault(oid, {})[int(n)] = body
        self._send(200, {}, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def lfs_complete(self, body: bytes, query: dict, oid: str) -> None:
        parts = self.hub.parts.pop(oid, {})
        numbers = [p["partNumber"] for p in json.loads(body)["parts"]]
        if sorted(parts) != numbers:
            return self._error(400, "parts missing")
        self._store(oid, b"".join(parts[n] for n in numbers))

    def lfs_verify(self, body: bytes, query: dict, oid: str) -> None:
        if oid not in self.hub.objects:
            return self._error(404, "object not found")
        self._send(200, {})

    def commit(self, body: bytes, query: dict, repo: str, rev: str) -> None:
        found = self._repo(repo, rev)
        if found is None:
            return None
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != found.branches[rev]:
            return self._error(412, "parent commit is not the head of the branch")
        tree = dict(found.tree(rev))
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                content = base64.b64decode(value["content"])
                tree[value["path"]] = StoredFile(
                    len(content), hashlib.sha256(content).hexdigest(), False, content
                )
            elif key == "lfsFile":
                if value["oid"] not in self.hub.objects:
                    return self._error(422, f"LFS object {value['oid']} was never uploaded")
                tree[value["path"]] = StoredFile(len(self.hub.objects[value["oid"]]), value["oid"], True)
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            else:
                return self._error(400, f"unsupported commit operation {key}")
        oid = self.hub._commit(found, rev, tree, header["summary"])
        self._send(
            200,
            {"commitUrl": f"{self.hub.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
        )


REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"
OID = r"(?P<oid>[0-9a-f]{64})"
ROUTES = [
    ("GET", r"/api/whoami-v2", _Handler.whoami, "read"),
    ("POST", r"/api/repos/create", _Handler.create_repo, "write"),
    ("POST", rf"/api/models/{REPO}/branch/{REV}", _Handler.create_branch, "write"),
    ("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<sub>.+))?", _Handler.tree, "read"),
    ("GET", rf"/api/models/{REPO}(?:/revision/{REV})?", _Handler.revision, "read"),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml, "read"),
    ("POST", rf"/api/models/{REPO}/preupload/{REV}", _Handler.preupload, "write"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch, "write"),
    ("PUT", rf"/lfs/{OID}", _Handler.lfs_put, None),  # pre-signed storage URLs carry no token
    ("PUT", rf"/lfs/{OID}/part/(?P<n>\d+)", _Handler.lfs_part, None),
    ("POST", rf"/lfs/{OID}", _Handler.lfs_complete, None),
    ("POST", rf"/lfs/{OID}/verify", _Handler.lfs_verify, "read"),
    ("POST", rf"/api/models/{REPO}/commit/{REV}", _Handler.commit, "write"),
]


@contextmanager
def serve_hub(user: str = "alice") -> Iterator[FakeHub]:
    """Run a FakeHub on 127.0.0.1 (a free port) for the duration of the block; its base URL is hub.url."""
    hub = FakeHub(user)
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
