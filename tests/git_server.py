"""
A real git server on loopback for the tests: bare repositories served by ``git http-backend``
(smart HTTP, CGI) behind a small stdlib HTTP server, optionally behind basic auth so that a
GitDagBundle's HTTPS-token connection is really exercised.

Usage::

    from git_server import GitServer

    with GitServer(auth=("git", "s3cret")) as server:      # auth=None: anonymous
        repo = server.create_repo("dags")                   # bare repo dags.git, branch main
        sha_a = repo.commit({"dags/hello.py": "..."}, "A")  # commit files and push to main
        sha_b = repo.commit({"dags/hello.py": "..."}, "B", branch="main")
        repo.url          # http://127.0.0.1:PORT/dags.git (no credentials in it)
        repo.authed_url   # http://git:s3cret@127.0.0.1:PORT/dags.git
        server.requests   # [(method, path, status), ...] served so far

``Repo.commit`` pushes with --force from its own working clone: push through the server
(``git push repo.authed_url``) only in tests that do not also use ``commit`` afterwards.

Over SSH (a real ``sshd`` on loopback, key auth only; needs the openssh-server package)::

    with GitServer() as server, GitSshServer(server) as ssh:
        repo = server.create_repo("dags")
        ssh.url(repo)            # ssh://USER@127.0.0.1:PORT/abs/path/dags.git
        ssh.client_key           # private key file the server accepts; ssh.known_hosts pins its host key

The server runs in a thread of the test process; Airflow components in other processes reach it
like any remote (the test process must stay alive, which it does while waiting on them).
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
}


def git(*args: str, cwd: Path | str | None = None) -> str:
    """Run git with a fixed identity and no user/system config; return stdout (raises on failure)."""
    env = {**os.environ, **GIT_ENV, "HOME": tempfile.gettempdir()}
    out = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


class Repo:
    """A bare repository on the server plus a private working clone used to commit and push."""

    def __init__(self, server: GitServer, name: str) -> None:
        self.server = server
        self.name = name
        self.bare = server.root / f"{name}.git"
        self.work = server.root / "_work" / name
        git("init", "--bare", "--initial-branch=main", str(self.bare))
        git("config", "http.receivepack", "true", cwd=self.bare)
        git("init", "--initial-branch=main", str(self.work))

    @property
    def url(self) -> str:
        return f"{self.server.url}/{self.name}.git"

    @property
    def authed_url(self) -> str:
        if not self.server.auth:
            return self.url
        user, password = self.server.auth
        return f"http://{user}:{password}@127.0.0.1:{self.server.port}/{self.name}.git"

    def commit(self, files: dict[str, str | None], message: str = "commit", branch: str = "main") -> str:
        """Write (or, for ``None``, delete) ``files`` on ``branch``, commit, push; return the commit sha."""
        if not git("rev-parse", "--all", cwd=self.work):  # nothing committed yet: the branch is unborn
            git("symbolic-ref", "HEAD", f"refs/heads/{branch}", cwd=self.work)
        elif git("branch", "--list", branch, cwd=self.work):
            git("checkout", "-q", branch, cwd=self.work)
        else:
            git("checkout", "-q", "-b", branch, cwd=self.work)
        for rel, content in files.items():
            path = self.work / rel
            if content is None:
                path.unlink(missing_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "--allow-empty", "-m", message, cwd=self.work)
        git("push", "-q", "--force", str(self.bare), f"{branch}:{branch}", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)

    def tag(self, name: str, ref: str = "HEAD") -> None:
        git("tag", "-f", name, ref, cwd=self.work)
        git("push", "-q", "--force", str(self.bare), f"refs/tags/{name}", cwd=self.work)

    def head(self, branch: str = "main") -> str:
        return git("rev-parse", branch, cwd=self.bare)


class GitServer:
    """Loopback smart-HTTP git server (``git http-backend``); a context manager."""

    def __init__(self, auth: tuple[str, str] | None = None) -> None:
        self.auth = auth
        self.root = Path(tempfile.mkdtemp(prefix="rex-git-"))
        self.requests: list[tuple[str, str, int]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def create_repo(self, name: str) -> Repo:
        return Repo(self, name)

    def __enter__(self) -> GitServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, name="git-http", daemon=True).start()
        return self

    def __exit__(self, *_exc) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
        shutil.rmtree(self.root, ignore_errors=True)


SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)


class GitSshServer:
    """``sshd`` on a loopback port serving the repositories of a :class:`GitServer` by absolute path."""

    def __init__(self, git_server: GitServer) -> None:
        if not SSHD:
            raise RuntimeError("sshd not found: install openssh-server")
        self.git_server = git_server
        self.dir = Path(tempfile.mkdtemp(prefix="rex-sshd-"))
        self.user = getpass.getuser()
        self.client_key = self.dir / "client_key"
        self.other_key = self.dir / "other_key"  # a key the server does not accept
        self.known_hosts = self.dir / "known_hosts"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def url(self, repo: Repo) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{repo.bare}"

    def __enter__(self) -> GitSshServer:
        for key in ("host_key", "client_key", "other_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / key)], check=True)
        (self.dir / "authorized_keys").write_text((self.dir / "client_key.pub").read_text())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        host_pub = (self.dir / "host_key.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        config = self.dir / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir / 'host_key'}\n"
            f"PidFile {self.dir / 'sshd.pid'}\nAuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nLogLevel ERROR\n"
            f"SetEnv PATH={os.environ.get('PATH', '/usr/bin:/bin')}\n"
        )
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=open(self.dir / "sshd.log", "wb"))
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.dir / 'sshd.log').read_text()}")
            with socket.socket() as s, contextlib.suppress(OSError):
                s.settimeout(1)
                s.connect(("127.0.0.1", self.port))
                if s.recv(4).startswith(b"SSH-"):
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError("sshd did not answer within 30s")
            time.sleep(0.1)

    def __exit__(self, *_exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _handler(server: GitServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args) -> None:  # quiet: the tests read server.requests instead
            pass

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _authorized(self) -> bool:
            if not server.auth:
                return True
            expected = base64.b64encode(":".join(server.auth).encode()).decode()
            return self.headers.get("Authorization", "") == f"Basic {expected}"

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            if not self._authorized():
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.end_headers()
                server.requests.append((self.command, parts.path, 401))
                return
            body = self._body()
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "GIT_PROJECT_ROOT": str(server.root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "GATEWAY_INTERFACE": "CGI/1.1",
                "REQUEST_METHOD": self.command,
                "PATH_INFO": parts.path,
                "QUERY_STRING": parts.query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "REMOTE_ADDR": self.client_address[0],
                "REMOTE_USER": server.auth[0] if server.auth else "anonymous",
            }
            for header in ("Content-Encoding", "Git-Protocol"):
                if value := self.headers.get(header):
                    env["HTTP_" + header.upper().replace("-", "_")] = value
            out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, timeout=120)
            head, _, payload = out.stdout.partition(b"\r\n\r\n")
            if not _:
                head, _, payload = out.stdout.partition(b"\n\n")
            status, headers = 200, []
            for line in head.decode("latin-1").splitlines():
                key, _, value = line.partition(":")
                if key.lower() == "status":
                    status = int(value.strip().split()[0])
                elif key:
                    headers.append((key, value.strip()))
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            server.requests.append((self.command, parts.path, status))

    return Handler
