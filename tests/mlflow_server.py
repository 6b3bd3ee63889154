"""A real `mlflow server` on loopback (SQLite store, artifacts served over HTTP) for registry and UI tests.

With auth=True it runs MLflow's basic-auth app as charts/emgate does (`--app-name basic-auth`, an auth ini with
`default_permission` READ and no secret in it, the admin from MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD): the admin is the
gate's account, every other user reads only. Clients authenticate as MLflow's own do, from MLFLOW_TRACKING_USERNAME
and MLFLOW_TRACKING_PASSWORD (`as_user`).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


@dataclass(frozen=True)
class Account:
    """A basic-auth user of the server."""

    username: str
    password: str


@contextmanager
def as_user(account: Account | None) -> Iterator[None]:
    """MLflow clients (MlflowClient, the artifact repositories, AuthServiceClient, the emgate CLI) within send
    `account`'s credentials, read from the environment on every request; None: no credentials at all."""
    saved = {k: os.environ.get(k) for k in (USERNAME_ENV, PASSWORD_ENV)}
    os.environ.pop(USERNAME_ENV, None)
    os.environ.pop(PASSWORD_ENV, None)
    if account is not None:
        os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV] = account.username, account.password
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None, auth: bool = False, default_permission: str = "READ",
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.env = env or {}  # extra server settings, e.g. the webhook ones
        self.port = port or _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.default_permission = default_permission
        # the admin (the gate's account), with a fresh password per server: a test can search for it
        self.admin = Account("emgate-admin", f"pw-{secrets.token_hex(12)}") if auth else None
        self._flask_key = secrets.token_hex(16)
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90) -> MlflowServer:
        log = (self.root / "server.log").open("ab")
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_"))}
        env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        env.update(self.env)
        if self.admin is not None:
            cmd += ["--app-name", "basic-auth"]
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(self._auth_ini()), MLFLOW_AUTH_ADMIN_USERNAME=self.admin.username,
                       MLFLOW_AUTH_ADMIN_PASSWORD=self.admin.password, MLFLOW_FLASK_SERVER_SECRET_KEY=self._flask_key)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health in {timeout_s} s")

    def _auth_ini(self) -> Path:
        """The chart's basic_auth.ini (templates/mlflow-auth-configmap.yaml), its user store in root. One addition:
        MLflow's credential cache (auth_cache_ttl_seconds), which only spares the password hash check (scrypt) on
        repeated logins; authorization is decided on every request as without it. Without the cache each request
        costs about a second on a loaded two-core machine, and one gated run makes hundreds."""
        ini = self.root / "basic_auth.ini"
        ini.write_text("[mlflow]\n"
                       f"default_permission = {self.default_permission}\n"
                       f"database_uri = sqlite:///{self.root / 'basic_auth.db'}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                       "grant_default_workspace_access = false\n"
                       "auth_cache_ttl_seconds = 600\n")
        return ini

    def create_user(self, username: str) -> Account:
        """An ordinary user (default_permission on everything it did not create), created by the admin through
        MLflow's AuthServiceClient."""
        from mlflow.server import get_app_client

        if self.admin is None:
            raise RuntimeError("create_user needs a server started with auth=True")
        account = Account(username, f"pw-{secrets.token_hex(12)}")
        with as_user(self.admin):
            get_app_client("basic-auth", tracking_uri=self.url).create_user(account.username, account.password)
        return account

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server's gunicorn/uvicorn workers too
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
