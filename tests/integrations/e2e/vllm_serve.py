"""Running real `vllm serve` instances and examples/vllm_proxy.py: what the e2e test
(test_vllm_serve_pair.py) and the TTFT benchmark (benchmarks/ttft_pair.py) share.

The tiny model (make_tiny_model.py), prompts of made-up words (one token each), servers and
proxies in their own process groups (``stop`` reaches vLLM's engine core too), readiness, and
plain HTTP. No pytest here: the benchmark imports it as a plain module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waiting import wait_until

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
VLLM = Path(sys.executable).parent / "vllm"
PROXY = ROOT / "examples/vllm_proxy.py"


def load_proxy() -> Any:
    """examples/vllm_proxy.py as a module (its ``prefill_request`` is step 1 of the proxy)."""
    spec = importlib.util.spec_from_file_location("vllm_proxy", PROXY)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_model(out: Path) -> Path:
    """The tiny random-weight Llama and its tokenizer (make_tiny_model.py) in ``out``."""
    sys.path.insert(0, str(HERE))
    from make_tiny_model import make

    return make(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prompt(words: int, seed: int) -> str:
    """``words`` made-up words (one token each, + BOS), the same for the same seed."""
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(3, 1024)}" for _ in range(words))


def post(url: str, body: dict[str, Any], timeout: float = 120.0) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"raw": raw.decode(errors="replace")}


def server_env(**extra: str) -> dict[str, str]:
    """The environment of the servers and proxies: this checkout's dxl first on the path (the
    venv may have another one installed), a small KV cache, no thread pinning (several servers
    share the cores), offline."""
    env = dict(os.environ)
    path = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(
        PYTHONPATH=os.pathsep.join(path),
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache per server (the default is 4)
        VLLM_CPU_OMP_THREADS_BIND="nobind",  # servers share the cores: no pinning
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        DXL_LOG_LEVEL="INFO",
    )
    env.update(extra)
    return env


@dataclass
class Proc:
    name: str
    cmd: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        with self.log.open("wb") as out:  # its own session: killpg reaches its engine process
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        # the group's other members (vLLM's engine core) exit with their parent; make sure
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@dataclass
class Server(Proc):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        """``/metrics`` samples, by name and labels (``name{labels}``) without the engine and
        model labels."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, _, value = line.rpartition(" ")
            key = re.sub(r'(engine|model_name)="[^"]*",?', "", key).replace(",}", "}")
            out[key.replace("{}", "")] = float(value)
        return out


def dxl_kv_config(policy: str, extra: dict[str, Any]) -> dict[str, Any]:
    """``--kv-transfer-config`` for DxlConnector (``kv_both``)."""
    return {
        "kv_connector": "DxlConnector",
        "kv_connector_module_path": "dxl.integrations.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": policy,  # a top-level key, not one of dxl's
        "kv_connector_extra_config": extra,
    }


def serve(name: str, model: Path, tmp: Path, kv: dict[str, Any] | None, port: int = 0) -> Server:
    """A `vllm serve` of the tiny model (``kv``: its --kv-transfer-config; None: without a
    connector, a single instance)."""
    port = port or free_port()
    cmd = [
        str(VLLM), "serve", str(model),
        "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32",
        "--max-model-len", "1024", "--max-num-seqs", "4",
        "--block-size", "32",  # vLLM's CPU attention wants a multiple of 32
        "--enforce-eager",  # no torch.compile warm-up: starts in half the time
    ]  # fmt: skip
    if kv is not None:
        cmd += ["--kv-transfer-config", json.dumps(kv)]
    return Server(name, cmd, tmp / f"{name}.log", port=port)


def wait_healthy(servers: list[Server], deadline_s: float) -> None:
    """Until every server answers /health; fails at once, with its log, if one exits."""

    def ready() -> bool:
        for s in servers:
            if not s.alive():
                raise AssertionError(f"{s.name} exited:\n{s.tail()}")
        return all(s.healthy() for s in servers)

    names = ", ".join(s.name for s in servers)
    wait_until(ready, deadline_s, f"vllm serve healthy: {names}")


def start_proxy(
    name: str, prefill: Server, decode: Server, tmp: Path, env: dict[str, str], *args: str
) -> tuple[Proc, str]:
    """examples/vllm_proxy.py in front of ``prefill`` and ``decode`` on a free port: the
    process (started: stop it) and its URL."""
    p = Proc(
        name,
        [
            sys.executable, str(PROXY),
            "--prefill", prefill.url, "--decode", decode.url, "--port", "0", *args,
        ],
        tmp / f"{name}.log",
    )  # fmt: skip
    p.start(env)
    try:
        line = wait_until(
            lambda: re.search(r"listening on (http://\S+)", p.text()), 30, f"{name} listening"
        )
    except BaseException:
        p.stop()
        raise
    return p, str(line.group(1))
