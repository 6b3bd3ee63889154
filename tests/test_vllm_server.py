"""The vLLM server lifecycle: a failed start says why (with the server's log) and leaves no process behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from emgate.recipe import ServingSpec
from emgate.vllm_server import ServerError, VllmServer, free_port, running, vllm_python

pytestmark = pytest.mark.slow


def _descendants_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_bad_model_path_fails_with_the_log_tail_and_no_orphans(tmp_path: Path) -> None:
    if not Path(vllm_python(ServingSpec())).exists():
        pytest.skip("no vLLM environment (scripts/setup.sh makes .venv-vllm)")
    (tmp_path / "config.json").write_text("{}")  # a folder that is not a model
    server = VllmServer(model_path=tmp_path, served_name="broken", serving=ServingSpec(startup_timeout_s=120))
    with pytest.raises(ServerError) as info, running(server):
        pass
    message = str(info.value)
    assert "exited with code" in message and "Log tail" in message
    assert len(message) > 200  # the tail of the server's own log is in the message
    assert server.process is None


def test_a_taken_port_is_refused_before_starting(tmp_path: Path) -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        server = VllmServer(model_path=tmp_path, served_name="x", serving=ServingSpec(), port=port)
        with pytest.raises(ServerError, match=f"port {port} on 127.0.0.1 is taken"):
            server.start()


def test_stop_kills_the_whole_process_group() -> None:
    proc = subprocess.Popen(["bash", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    server = VllmServer(model_path=Path("."), served_name="x", serving=ServingSpec())
    server.process = proc
    server.stop()
    assert proc.poll() is not None
    assert not _descendants_alive(proc.pid)  # the background sleeps died with their leader


def test_a_port_whose_server_just_stopped_is_free_again() -> None:
    """A stopped server's connections wait in TIME_WAIT on its port; the fixed judge port must still count as free
    (else a rerun serves the judge elsewhere and no stage is reused from the KFP cache)."""
    import socket
    import time

    from emgate.vllm_server import port_is_free

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn, vLLM's server, binds
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    assert not port_is_free("127.0.0.1", port)  # something listens
    conn.close()  # the server closes first, as a killed server does: its side waits in TIME_WAIT
    server.close()
    time.sleep(0.2)
    client.close()
    assert port_is_free("127.0.0.1", port)
