"""
Protocol-level fakes of Azure Key Vault and GCP Secret Manager (no emulators exist), so the real client
libraries (``azure-keyvault-secrets`` + ``azure-identity``, ``google-cloud-secret-manager`` over gRPC)
and Airflow's real backends run unchanged against their real host names:

- a CA (:class:`TestCA`) issues the servers' certificates for ``*.vault.azure.net`` and
  ``secretmanager.googleapis.com``; clients trust it through ``REQUESTS_CA_BUNDLE`` /
  ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``;
- a CONNECT proxy (:class:`RedirectingProxy`, via ``HTTPS_PROXY`` / ``grpc_proxy``) sends those host
  names to the fakes on loopback;
- :class:`FakeKeyVault` speaks the Key Vault secrets REST API with its bearer challenge (401 +
  ``WWW-Authenticate``) and an App Service managed-identity token endpoint;
- :class:`FakeSecretManager` serves ``AccessSecretVersion`` and checks the service account's signed JWT.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
import select
import socket
import socketserver
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class TestCA:
    """A throwaway CA in ``directory``; :meth:`issue` signs server certificates for DNS names or IPs."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "remote-execution test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / "ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, *dns_names: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0].lstrip("*."))]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([_san(n) for n in dns_names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        stem = dns_names[0].replace("*", "wildcard")
        cert_path, key_path = self.directory / f"{stem}.crt", self.directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        return cert_path, key_path


class RedirectingProxy:
    """An HTTP CONNECT proxy that tunnels ``host:port`` to the loopback address ``routes`` maps its host to
    (exact name or ``*.suffix``); anything else gets 502, so nothing leaves the machine."""

    def __init__(self, routes: dict[str, tuple[str, int]]):
        self.routes = routes
        self.tunnels: list[str] = []
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                method, target = head.split(b"\r\n", 1)[0].decode().split()[:2]
                upstream = proxy.route(target.rsplit(":", 1)[0]) if method == "CONNECT" else None
                if upstream is None:
                    self.request.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                    return
                proxy.tunnels.append(target)
                with socket.create_connection(upstream, timeout=10) as remote:
                    self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    _pipe(self.request, remote)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def route(self, host: str) -> tuple[str, int] | None:
        for pattern, address in self.routes.items():
            if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
                return address
        return None

    def __enter__(self) -> RedirectingProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_):
        self.server.shutdown()
        self.server.server_close()


def _pipe(a: socket.socket, b: socket.socket) -> None:
    sockets = [a, b]
    while True:
        readable, _, _ = select.select(sockets, [], [], 30)
        if not readable:
            return
        for s in readable:
            data = s.recv(65536)
            if not data:
                return
            (b if s is a else a).sendall(data)


class _Server:
    """A stdlib HTTP(S) server in a thread; subclasses define the handler's ``do_GET``."""

    def __init__(self, handler, tls: tuple[Path, Path] | None = None):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.fake = self  # handlers reach their server's state through self.server.fake
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*map(str, tls))
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json; charset=utf-8", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_):
        pass


# ---------------------------------------------------------------------------------- Azure Key Vault


class _KeyVaultHandler(_Handler):
    def do_GET(self):  # noqa: N802
        fake: FakeKeyVault = self.server.fake
        url = urlparse(self.path)
        if url.path == "/msi/token":  # App Service managed identity (IDENTITY_ENDPOINT)
            fake.token_requests.append(parse_qs(url.query))
            if self.headers.get("X-IDENTITY-HEADER") != fake.identity_header:
                return self.reply(401, {"error": "invalid identity header"})
            return self.reply(
                200,
                {
                    "access_token": fake.access_token,
                    "expires_on": str(int(time.time()) + 3600),
                    "resource": parse_qs(url.query)["resource"][0],
                    "token_type": "Bearer",
                },
            )
        parts = [p for p in url.path.split("/") if p]
        if len(parts) < 2 or parts[0] != "secrets" or "api-version" not in parse_qs(url.query):
            return self.reply(400, {"error": {"code": "BadParameter", "message": f"unsupported {url.path}"}})
        auth = self.headers.get("Authorization", "")
        if auth != f"Bearer {fake.access_token}":
            fake.challenges += 1
            challenge = (
                f'Bearer authorization="https://login.microsoftonline.com/{fake.tenant}", '
                'resource="https://vault.azure.net"'
            )
            return self.reply(
                401,
                {"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}},
                {"WWW-Authenticate": challenge},
            )
        name = parts[1]
        fake.reads.append(name)
        if name not in fake.secrets:
            return self.reply(
                404,
                {
                    "error": {
                        "code": "SecretNotFound",
                        "message": f"A secret with (name/id) {name} was not found in this key vault.",
                    }
                },
            )
        host = self.headers.get("Host", "kv")
        return self.reply(
            200,
            {
                "value": fake.secrets[name],
                "id": f"https://{host}/secrets/{name}/0123456789abcdef",
                "attributes": {
                    "enabled": True,
                    "created": 1700000000,
                    "updated": 1700000000,
                    "recoveryLevel": "Recoverable+Purgeable",
                },
            },
        )


class FakeKeyVault:
    """Key Vault secrets API over HTTPS (``tls``: its certificate) plus a managed-identity token endpoint
    on the same port at ``/msi/token``. ``secrets`` maps secret name -> value."""

    def __init__(self, tls: tuple[Path, Path], secrets_: dict[str, str]):
        self.secrets = dict(secrets_)
        self.tenant = "72f988bf-0000-0000-0000-000000000000"
        self.identity_header = secrets.token_hex(16)
        self.access_token = secrets.token_urlsafe(24)
        self.token_requests: list[dict] = []
        self.reads: list[str] = []
        self.challenges = 0
        self.https = _Server(_KeyVaultHandler, tls)
        self.http = _Server(_KeyVaultHandler)  # the token endpoint is plain HTTP, as App Service's is
        self.https.httpd.fake = self.http.httpd.fake = self

    def identity_env(self) -> dict[str, str]:
        """Environment that makes azure-identity's ManagedIdentityCredential use this token endpoint."""
        return {
            "IDENTITY_ENDPOINT": f"http://127.0.0.1:{self.http.port}/msi/token",
            "IDENTITY_HEADER": self.identity_header,
        }

    def __enter__(self) -> FakeKeyVault:
        self.https.__enter__()
        self.http.__enter__()
        return self

    def __exit__(self, *exc):
        self.https.__exit__(*exc)
        self.http.__exit__(*exc)


# ---------------------------------------------------------------------------------- GCP Secret Manager


def service_account_key(path: Path, project_id: str) -> rsa.RSAPrivateKey:
    """Write a service account key file (as GCP issues them) for a throwaway RSA key; return the key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": project_id,
                "private_key_id": secrets.token_hex(20),
                "private_key": _pem_key(key).decode(),
                "client_email": f"airflow-agent@{project_id}.iam.gserviceaccount.com",
                "client_id": "1234567890",
                "token_uri": "https://oauth2.googleapis.com/token",
                "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            }
        )
    )
    return key


class FakeSecretManager:
    """``google.cloud.secretmanager.v1.SecretManagerService/AccessSecretVersion`` over gRPC with TLS.
    Requests must carry a JWT signed by ``public_key`` (the service account's self-signed JWT access)."""

    SERVICE = "google.cloud.secretmanager.v1.SecretManagerService"

    def __init__(self, tls: tuple[Path, Path], public_key, secrets_: dict[str, str]):
        self.tls = tls
        self.public_key = public_key
        self.secrets = dict(secrets_)  # "projects/<p>/secrets/<id>" -> value
        self.reads: list[str] = []
        self.server = None
        self.port = 0

    def _access(self, request, context):
        import grpc
        import jwt
        from google.cloud.secretmanager_v1 import AccessSecretVersionResponse, SecretPayload

        auth = dict(context.invocation_metadata()).get("authorization", "")
        try:
            jwt.decode(
                auth.removeprefix("Bearer "), self.public_key, algorithms=["RS256"], options={"verify_aud": False}
            )
        except jwt.PyJWTError as e:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"invalid credentials: {e}")
        name = request.name.rsplit("/versions/", 1)[0]
        self.reads.append(name)
        if name not in self.secrets:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Secret [{name}] not found or has no versions.")
        return AccessSecretVersionResponse(name=request.name, payload=SecretPayload(data=self.secrets[name].encode()))

    def __enter__(self) -> FakeSecretManager:
        from concurrent import futures

        import grpc
        from google.cloud.secretmanager_v1 import AccessSecretVersionRequest, AccessSecretVersionResponse

        handler = grpc.method_handlers_generic_handler(
            self.SERVICE,
            {
                "AccessSecretVersion": grpc.unary_unary_rpc_method_handler(
                    self._access,
                    request_deserializer=AccessSecretVersionRequest.deserialize,
                    response_serializer=AccessSecretVersionResponse.serialize,
                ),
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
        cert, key = self.tls
        credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()
        return self

    def __exit__(self, *_):
        self.server.stop(grace=None)


# ---------------------------------------------------------------------------------- Kubernetes TokenReview


def service_account_jwt(namespace: str, name: str) -> str:
    """A token shaped like a service account token, signed by a throwaway key: only the TokenReview
    API (here :class:`FakeKubernetesAPI`) decides whether it is valid, as with Vault's default config."""
    import jwt

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = {
        "iss": "kubernetes/serviceaccount",
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/secret.name": f"{name}-token",
        "kubernetes.io/serviceaccount/service-account.name": name,
        "kubernetes.io/serviceaccount/service-account.uid": "0a1b2c3d-sa",
    }
    return jwt.encode(claims, _pem_key(key), algorithm="RS256")


class _TokenReviewHandler(_Handler):
    def do_POST(self):  # noqa: N802
        fake: FakeKubernetesAPI = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        fake.requests.append(self.path)
        if self.path != "/apis/authentication.k8s.io/v1/tokenreviews":
            return self.reply(404, {"kind": "Status", "status": "Failure", "code": 404})
        if self.headers.get("Authorization") != f"Bearer {fake.reviewer_jwt}":
            return self.reply(401, {"kind": "Status", "status": "Failure", "code": 401, "reason": "Unauthorized"})
        token = body.get("spec", {}).get("token", "")
        identity = fake.tokens.get(token)
        fake.reviews.append((token, identity is not None))
        status: dict = {"authenticated": False, "error": "token not valid"}
        if identity:
            namespace, name = identity
            status = {
                "authenticated": True,
                "audiences": body.get("spec", {}).get("audiences") or [],
                "user": {
                    "username": f"system:serviceaccount:{namespace}:{name}",
                    "uid": "0a1b2c3d-sa",
                    "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
                },
            }
        self.reply(
            201,
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": body.get("spec", {}),
                "status": status,
            },
        )


class FakeKubernetesAPI:
    """The one Kubernetes API call Vault's kubernetes auth makes, ``TokenReview``, over HTTPS.
    ``tokens`` maps a service account token -> (namespace, name) it authenticates as."""

    def __init__(self, tls: tuple[Path, Path], tokens: dict[str, tuple[str, str]]):
        self.tokens = dict(tokens)
        self.reviewer_jwt = secrets.token_urlsafe(24)
        self.reviews: list[tuple[str, bool]] = []
        self.requests: list[str] = []
        self.https = _Server(_TokenReviewHandler, tls)
        self.https.httpd.fake = self
        self.url = f"https://127.0.0.1:{self.https.port}"

    def __enter__(self) -> FakeKubernetesAPI:
        self.https.__enter__()
        return self

    def __exit__(self, *exc):
        self.https.__exit__(*exc)
