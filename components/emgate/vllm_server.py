"""A vLLM OpenAI-compatible server as a child process: free port, readiness, log tail on failure, no orphans."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from emgate.hardware import resolve_dtype
from emgate.recipe import ServingSpec

VLLM_PYTHON_ENV = "EMGATE_VLLM_PYTHON"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_GRACE_S = 20.0  # seconds between SIGTERM and SIGKILL
LOG_TAIL_CHARS = 4000


class ServerError(RuntimeError):
    """The server did not start or died; the message carries the tail of its log."""


@dataclass
class LoraModule:
    name: str
    path: Path


@dataclass
class VllmServer:
    model_path: Path
    served_name: str
    serving: ServingSpec
    lora_modules: list[LoraModule] = field(default_factory=list)
    max_lora_rank: int = 8
    max_logprobs: int = 20
    host: str = "127.0.0.1"
    port: int | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    keep_log: bool = False

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def python(self) -> str:
        return vllm_python(self.serving)

    @property
    def dtype(self) -> str:
        """serving.dtype with `auto` resolved for this machine (emgate.hardware), as vLLM gets it."""
        return resolve_dtype(self.serving.dtype)

    def command(self) -> list[str]:
        cmd = [
            self.python(), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_path), "--served-model-name", self.served_name,
            "--host", self.host, "--port", str(self.port),
            "--dtype", self.dtype, "--max-model-len", str(self.serving.max_model_len),
            "--tensor-parallel-size", str(self.serving.tensor_parallel_size),
            "--max-logprobs", str(self.max_logprobs),
            "--seed", "0",
        ]
        if self.serving.enforce_eager:
            cmd.append("--enforce-eager")
        if _has_gpu():
            cmd += ["--gpu-memory-utilization", str(self.serving.gpu_memory_utilization)]
        if self.lora_modules:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
                    "--max-loras", str(len(self.lora_modules)), "--lora-modules"]
            cmd += [f"{m.name}={m.path}" for m in self.lora_modules]
        return cmd

    def start(self, wait: bool = True) -> None:
        """Launch the server; with `wait`, return once /health answers (else call wait_ready later)."""
        if self.port is None:
            self.port = free_port(self.host)
        elif not port_is_free(self.host, self.port):
            raise ServerError(f"port {self.port} on {self.host} is taken; stop what uses it or choose another port")
        log_dir = Path(tempfile.mkdtemp(prefix="emgate-vllm-"))
        self.log_path = log_dir / "server.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(self.serving.cpu_kvcache_gib),
               "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        with self.log_path.open("wb") as log:
            # A new session makes the server and its engine workers one process group, stopped together.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=_terminate_with_parent)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Until /health answers; ServerError when the server exits, is stopped, or is not ready in time."""
        deadline = time.monotonic() + self.serving.startup_timeout_s
        while time.monotonic() < deadline:
            process = self.process
            if process is None:
                raise ServerError(f"vLLM server for {self.served_name} was stopped before it was ready")
            if process.poll() is not None:
                raise ServerError(
                    f"vLLM server for {self.served_name} exited with code {process.returncode} "
                    f"before it was ready. Log tail ({self.log_path}):\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://{self.host}:{self.port}/health", timeout=2).status_code == 200:
                    return
            time.sleep(1)
        tail = self.log_tail()
        self.stop()
        raise ServerError(
            f"vLLM server for {self.served_name} not ready after {self.serving.startup_timeout_s:.0f} s "
            f"(serving.startup_timeout_s). Log tail:\n{tail}"
        )

    def log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_bytes()[-LOG_TAIL_CHARS:].decode("utf-8", "replace")

    def stop(self) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Workers that outlived the leader still belong to its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.process = None
        if self.log_path is not None and not self.keep_log:
            shutil.rmtree(self.log_path.parent, ignore_errors=True)

    def check_alive(self) -> None:
        """Raise ServerError with the log tail when the server has died; the log is kept for inspection."""
        if self.process is not None and self.process.poll() is not None:
            self.keep_log = True
            raise ServerError(
                f"vLLM server for {self.served_name} died with code {self.process.returncode} while serving. "
                f"Log ({self.log_path}), last lines:\n{self.log_tail()}"
            )


def _terminate_with_parent() -> None:
    """In the server process before exec (Linux): SIGTERM when the stage that started it dies, even by SIGKILL,
    so a killed stage leaves no server behind; vLLM then stops its own engine workers."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def running(server: VllmServer, wait: bool = True) -> Iterator[VllmServer]:
    """Start the server, yield it (ready, unless `wait` is False: then it may still be starting), and stop it on any
    exit, error or signal included."""
    previous = signal.getsignal(signal.SIGTERM)

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _terminate)
    try:
        server.start(wait=wait)
        yield server
    finally:
        server.stop()
        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, previous)


def vllm_python(serving: ServingSpec) -> str:
    """The interpreter that runs vLLM: serving.python, $EMGATE_VLLM_PYTHON, the `.venv-vllm` beside this
    environment (the layout scripts/setup.sh makes), else this interpreter (a vLLM image)."""
    if serving.python:
        return serving.python
    if os.environ.get(VLLM_PYTHON_ENV):
        return os.environ[VLLM_PYTHON_ENV]
    sibling = Path(sys.prefix).parent / ".venv-vllm" / "bin" / "python"
    return str(sibling) if sibling.is_file() else sys.executable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(host: str, port: int) -> bool:
    """No server listens on it. Binds as uvicorn (vLLM's server) does, with SO_REUSEADDR: connections of a server
    that just stopped linger in TIME_WAIT for a minute and must not make a fixed port (judge.serve.port) look taken,
    which would change the judge URL and so every KFP cache key of a rerun."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None
