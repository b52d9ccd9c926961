"""Starts `vllm serve` (the real CLI) on 127.0.0.1 for tests, and stops it."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Server:
    base_url: str
    model: str
    proc: subprocess.Popen
    log_path: str

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def metrics(self) -> str:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as r:
            return r.read().decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model: str, args: list[str], log_path: str, env: dict[str, str] | None) -> Server:
    port = _free_port()
    vllm_cmd = shutil.which("vllm", path=os.path.dirname(sys.executable)) or "vllm"
    cmd = [vllm_cmd, "serve", model, "--host", "127.0.0.1", "--port", str(port), *args]
    proc_env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    proc_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc_env.update(env or {})
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=proc_env)
    return Server(f"http://127.0.0.1:{port}", model, proc, log_path)


def _wait_healthy(server: Server, deadline: float) -> None:
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {server.proc.returncode}:\n{server.log()[-4000:]}")
        try:
            with urllib.request.urlopen(server.base_url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"vllm serve did not become healthy:\n{server.log()[-4000:]}")
        time.sleep(1)


@contextlib.contextmanager
def vllm_servers(
    specs: list[tuple[str, list[str], str, dict[str, str] | None]], timeout_s: float = 400
) -> Iterator[list[Server]]:
    """Starts one `vllm serve` per (model, args, log_path, env) at once and yields them when every one answers
    /health, their start-ups overlapping (tests/test_routing_replicas.py: 286 s -> 244 s on 2 cores); stops
    them all."""
    servers: list[Server] = []
    try:
        for spec in specs:
            servers.append(_start(*spec))
        deadline = time.time() + timeout_s
        for server in servers:
            _wait_healthy(server, deadline)
        yield servers
    finally:
        for server in servers:
            server.proc.terminate()
        for server in servers:
            try:
                server.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


@contextlib.contextmanager
def vllm_server(
    model: str, args: list[str], log_path: str, timeout_s: float = 400, env: dict[str, str] | None = None
) -> Iterator[Server]:
    with vllm_servers([(model, args, log_path, env)], timeout_s) as (server,):
        yield server
