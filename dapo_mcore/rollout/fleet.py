"""The SGLang fleet of a rollout or eval stage: start the servers (one ``sglang-router`` with
``cache_aware`` in front of several), ask every server what it serves, swap weights, bring a server
that died back, and stop everything, waiting until the processes are gone (GPU memory freed).

Configured by :class:`~dapo_mcore.rollout.backend_config.BackendConfig` (``kind: sglang``): ``launch`` (start
the servers here, or use the external fleet at ``url``), ``swap_weights``, ``servers``, ``tp``,
``dp``, ``host``, ``port``, ``device``, ``mem_fraction_static``, ``server_args``, ``python``,
``router_path``, the timeouts and ``log_dir``.

- Each server is ``python -m sglang.launch_server`` in its own session / process group (``setsid``):
  stopping sends SIGTERM to the group, then SIGKILL after ``stop_grace_s``, and returns once no
  process of the group is left. On a CPU the servers run SGLang's CPU engine with
  :data:`CPU_SERVER_ARGS` (the SGLang venv of ``scripts/setup.sh --sglang`` carries the stand-ins
  it needs); on GPUs ``--tp-size/--dp-size/--mem-fraction-static`` and a ``CUDA_VISIBLE_DEVICES``
  slice per server. Every server gets ``--schedule-policy lpm`` and
  ``--weight-version`` = :func:`checkpoint_version` of its model.
- What a server serves: ``GET /get_model_info`` (``model_path``, ``weight_version``) of every
  worker (behind a router: the URLs its ``GET /workers`` lists, asked directly).
  :meth:`Fleet.ensure_serving` compares them with the stage's model; a mismatch is swapped
  (``POST /update_weights_from_disk`` with the checkpoint's version, then ``POST /flush_cache``) when
  ``swap_weights`` is on, or refused with :class:`ModelMismatch` naming both models.
- Recovery (:meth:`Fleet.recover`, called by the client when a request still fails after its
  retries): a launched server or router that died is restarted with the model it served, then the
  whole fleet must be healthy (every worker's ``/health``, the router listing them healthy) and
  still serve the checked model within ``recover_timeout_s``; an external fleet is waited for.

``open_backend(cfg, model_path)`` (what :func:`~dapo_mcore.rollout.common.make_backend` returns for
``kind: sglang``) and the ``serving(...)`` context manager put this together for one stage; see
``docs/rollouts.md`` for the calls a pipeline makes.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from dapo_mcore.rollout.backend import GenRequest
from dapo_mcore.rollout.backend_config import BackendConfig
from dapo_mcore.rollout.sglang_client import SGLangClient, SGLangClientConfig, SGLangError, ServedModelChanged

REPO_ROOT = Path(__file__).resolve().parents[2]
# SGLang 0.5.23's CPU engine (see docs/rollouts.md, "A real SGLang server on a CPU")
CPU_SERVER_ARGS = ("--device", "cpu", "--attention-backend", "torch_native", "--disable-overlap-schedule",
                   "--max-total-tokens", "8192", "--dtype", "float32")
CPU_SERVER_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}
LOG_TAIL_CHARS = 4000
BIND_ERROR = "[Errno 98]"      # what a server logs when its port is taken ("address already in use")
REBIND_TRIES = 3


class FleetError(RuntimeError):
    """A fleet could not be started, reached, checked, swapped or recovered (message says which and why)."""


class ModelMismatch(FleetError):
    """A server serves another model than the stage's and ``swap_weights`` is off."""


@dataclass(frozen=True)
class ServedModel:
    """What a fleet serves: the checkpoint path and the servers' ``weight_version``; ``as_dict()`` is
    what a stage stamps under ``served_model``."""

    model_path: str
    weight_version: str | None

    def as_dict(self) -> dict:
        return {"model_path": self.model_path, "weight_version": self.weight_version}


def same_model(served: str, wanted: str) -> bool:
    """Whether a server's ``model_path`` names the checkpoint ``wanted`` (same string or same real path)."""
    a, b = str(served).rstrip("/"), str(wanted).rstrip("/")
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def checkpoint_version(model_path: str | os.PathLike) -> str:
    """The ``weight_version`` the fleet gives a checkpoint: ``<dir name>@<12 hex>``, a SHA-1 over the
    names, sizes and mtimes of its weight and config files (cheap for a 72B checkpoint; changes when
    a file is rewritten). A path that is not a local directory hashes the path itself."""
    p = Path(model_path)
    h = hashlib.sha1()
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".pt"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    else:
        h.update(str(model_path).encode())
    return f"{p.name or 'model'}@{h.hexdigest()[:12]}"


def _tokenizer_digest(path: str | None) -> str | None:
    """SHA-1 of a local checkpoint's tokenizer files, or None if there are none to read."""
    if not path or not Path(path).is_dir():
        return None
    h, found = hashlib.sha1(), False
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model"):
        f = Path(path) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
            found = True
    return h.hexdigest() if found else None


def resolve_python(cfg: BackendConfig) -> str:
    """The interpreter that runs ``sglang.launch_server``: ``cfg.python``, else
    ``$DAPO_SGLANG_VENV/bin/python``, else the repo's ``.venv-sglang`` if present, else this one."""
    if cfg.python:
        return cfg.python
    if os.environ.get("DAPO_SGLANG_VENV"):
        return str(Path(os.environ["DAPO_SGLANG_VENV"]) / "bin" / "python")
    repo_venv = REPO_ROOT / ".venv-sglang" / "bin" / "python"
    return str(repo_venv) if repo_venv.exists() else sys.executable


def resolve_router(cfg: BackendConfig, python: str) -> str | None:
    """The ``sglang-router`` executable: ``cfg.router_path``, else beside ``python``, beside this
    interpreter, or on PATH (None if none)."""
    if cfg.router_path:
        return cfg.router_path
    for d in (Path(python).parent, Path(sys.executable).parent):
        if (d / "sglang-router").exists():
            return str(d / "sglang-router")
    return shutil.which("sglang-router")


def resolve_device(cfg: BackendConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def visible_gpus() -> list[str]:
    """The GPU ids this process may hand out: ``CUDA_VISIBLE_DEVICES``, else all that torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def server_command(cfg: BackendConfig, model_path: str, port: int, *, python: str, device: str,
                   weight_version: str, gpus: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """``(argv, extra environment)`` of one SGLang server for ``model_path`` on ``cfg.host:port``."""
    argv = [python, "-m", "sglang.launch_server", "--model-path", str(model_path), "--host", cfg.host,
            "--port", str(port), "--weight-version", weight_version, "--schedule-policy", "lpm"]
    env: dict[str, str] = {}
    if device == "cpu":
        argv += list(CPU_SERVER_ARGS)
        env.update(CPU_SERVER_ENV)
        if cfg.tp > 1:
            argv += ["--tp-size", str(cfg.tp)]
        if cfg.dp > 1:
            argv += ["--dp-size", str(cfg.dp)]
    else:
        argv += ["--tp-size", str(cfg.tp), "--dp-size", str(cfg.dp),
                 "--mem-fraction-static", str(cfg.mem_fraction_static)]
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return argv + [str(a) for a in cfg.server_args], env


def router_command(cfg: BackendConfig, router: str, port: int, worker_urls: list[str], prometheus_port: int,
                   startup_timeout_s: float) -> list[str]:
    """argv of the ``sglang-router`` (``cache_aware``) in front of ``worker_urls``."""
    return [router, "launch", "--host", cfg.host, "--port", str(port), "--worker-urls", *worker_urls,
            "--policy", "cache_aware", "--prometheus-host", cfg.host, "--prometheus-port", str(prometheus_port),
            "--worker-startup-timeout-secs", str(max(1, int(startup_timeout_s))),
            "--worker-startup-check-interval", "1", "--health-check-interval-secs", "5", "--log-level", "warn"]


def free_ports(host: str, n: int) -> list[int]:
    """``n`` distinct ports free on ``host`` now (all probed at once, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()   # state ppid pgrp ...
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(d.name))
    return out


class ManagedProcess:
    """One launched program (an SGLang server or the router) in its own process group, logging to
    ``log_path`` (appended: a restart keeps the earlier lines)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, url: str):
        self.name, self.argv, self.env, self.log_path, self.url = name, argv, env, Path(log_path), url
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log_start = 0

    @property
    def pgid(self) -> int:
        if self.proc is None:
            raise FleetError(f"{self.name} was never started")
        return self.proc.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONHOME"}
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.log_start = log.tell()           # log_tail() reads this start's lines only
            log.write(f"\n[dapo-mcore fleet] start {self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def gone(self) -> bool:
        return self.proc is None or (self.proc.poll() is not None and not _group_members(self.proc.pid))

    def stop(self, grace_s: float) -> None:
        """SIGTERM the group, SIGKILL it after ``grace_s``; return when no process of it is left."""
        if self.proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
            if self.gone():
                return
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and not self.gone():
                time.sleep(0.1)
        if not self.gone():
            raise FleetError(f"{self.name} (process group {self.proc.pid}) is still running after SIGKILL: "
                             f"processes {_group_members(self.proc.pid)}")

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The last ``chars`` characters the latest start logged."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(self.log_start, f.tell() - chars))
                return f.read().decode(errors="replace")
        except OSError as e:
            return f"(no log: {e})"

    def describe(self) -> str:
        if self.proc is None:
            state = "not started"
        else:
            state = "running" if self.alive() else f"exited with code {self.proc.returncode}"
        return f"{self.name} at {self.url} ({state}); last lines of {self.log_path}:\n{self.log_tail()}"


_LIVE: set["Fleet"] = set()


@atexit.register
def _stop_live_fleets() -> None:
    for f in list(_LIVE):
        try:
            f.stop()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


def _log(msg: str) -> None:
    print(f"[sglang fleet] {msg}", file=sys.stderr, flush=True)


# the BackendConfig fields that make a fleet (the others are client settings of one stage): two stages whose
# backends agree on these can share one fleet (Fleet.serves_config)
FLEET_FIELDS = ("launch", "servers", "tp", "dp", "host", "port", "device", "mem_fraction_static", "server_args",
                "python", "router_path", "stop_grace_s", "log_dir")


class Fleet:
    """The SGLang servers of ``cfg`` (``kind: sglang``): launched here (``cfg.launch``; see
    :meth:`start`) or external at ``cfg.url``. ``log_dir``: server and router logs (default
    ``cfg.log_dir``, else a new temporary directory)."""

    def __init__(self, cfg: BackendConfig, log_dir: str | os.PathLike | None = None):
        if cfg.kind != "sglang":
            raise ValueError(f"a fleet needs backend.kind 'sglang', got {cfg.kind!r}")
        self.cfg = cfg
        self._log_dir = log_dir or cfg.log_dir or None
        self.servers: list[ManagedProcess] = []
        self.router: ManagedProcess | None = None
        self.model_path: str | None = None        # what launched servers load (follows swaps)
        self.weight_version: str | None = None
        self.expected: ServedModel | None = None  # set by ensure_serving
        self.restarts = 0
        self._url = None if cfg.launch else cfg.url.rstrip("/")
        self._lock = threading.RLock()
        self.http = httpx.Client(timeout=30.0)

    # -- where ---------------------------------------------------------------------------------
    @property
    def log_dir(self) -> Path:
        if self._log_dir is None:
            self._log_dir = tempfile.mkdtemp(prefix="dapo-sglang-")
        return Path(self._log_dir)

    @property
    def url(self) -> str:
        """The URL the stage sends requests to: the router, or the single server."""
        if self._url is None:
            raise FleetError("the fleet is not started (backend.launch is true: call start(model_path))")
        return self._url

    @property
    def launched(self) -> bool:
        return bool(self.servers)

    def serves_config(self, cfg: BackendConfig) -> bool:
        """Whether a stage with backend ``cfg`` can use this fleet: same :data:`FLEET_FIELDS` (and, for an
        external fleet, the same ``url``)."""
        same = cfg.kind == "sglang" and all(getattr(cfg, f) == getattr(self.cfg, f) for f in FLEET_FIELDS)
        return same and (cfg.launch or cfg.url.rstrip("/") == self.cfg.url.rstrip("/"))

    def worker_urls(self) -> list[str]:
        """Every server behind :attr:`url` (a router's workers, from its ``GET /workers``)."""
        if self.launched:
            return [s.url for s in self.servers]
        try:
            r = self.http.get(f"{self.url}/workers", timeout=10.0)
        except httpx.HTTPError as e:
            raise FleetError(f"SGLang fleet at {self.url} is unreachable: {e!r}") from e
        if r.status_code == 200:
            try:
                workers = r.json().get("workers")
            except ValueError:
                workers = None
            if isinstance(workers, list):
                if not workers:
                    raise FleetError(f"the sglang-router at {self.url} lists no workers (GET /workers)")
                return [w["url"].rstrip("/") for w in workers]
        return [self.url]

    # -- launch / stop -------------------------------------------------------------------------
    def start(self, model_path: str | os.PathLike) -> "Fleet":
        """Launch ``cfg.servers`` servers for ``model_path`` (and a router if there are several);
        return once all are healthy and the router lists them, within ``cfg.launch_timeout_s``.
        On any failure everything started is stopped and :class:`FleetError` (with the log tail of
        the server that failed) is raised."""
        cfg = self.cfg
        if not cfg.launch:
            raise FleetError(f"backend.launch is false: the fleet at {cfg.url} is external")
        if self.servers:
            raise FleetError(f"the fleet is already started ({self.url})")
        python = resolve_python(cfg)
        if not (Path(python).exists() or shutil.which(python)):
            raise FleetError(f"SGLang's python {python!r} does not exist (scripts/setup.sh --sglang makes "
                             f".venv-sglang; or set backend.python / $DAPO_SGLANG_VENV)")
        device = resolve_device(cfg)
        with_router = cfg.servers > 1
        router = resolve_router(cfg, python) if with_router else None
        if with_router and router is None:
            raise FleetError("backend.servers > 1 needs sglang-router (pip install 'sglang-router==0.3.2'), "
                             "or set backend.router_path")
        slices: list[list[str] | None] = [None] * cfg.servers
        if device == "cuda":
            gpus, per = visible_gpus(), cfg.tp * cfg.dp
            if len(gpus) < cfg.servers * per:
                raise FleetError(f"backend.servers={cfg.servers} x tp={cfg.tp} x dp={cfg.dp} needs "
                                 f"{cfg.servers * per} GPUs, {len(gpus)} visible ({gpus})")
            slices = [gpus[i * per:(i + 1) * per] for i in range(cfg.servers)]
        n_ports = cfg.servers + int(with_router)
        ports = free_ports(cfg.host, n_ports) if cfg.port == 0 else list(range(cfg.port, cfg.port + n_ports))
        front, server_ports = (ports[0], ports[1:]) if with_router else (ports[0], ports)
        self.model_path, self.weight_version = str(model_path), checkpoint_version(model_path)
        self._device, self._python, self._slices = device, python, slices
        for i, port in enumerate(server_ports):
            self.servers.append(ManagedProcess(f"SGLang server {i}", *self._server_argv(i, port),
                                               self.log_dir / f"server-{i}.log", f"http://{cfg.host}:{port}"))
        self._url = f"http://{cfg.host}:{front}"
        _LIVE.add(self)
        try:
            deadline = time.monotonic() + cfg.launch_timeout_s
            for s in self.servers:
                s.start()
            _log(f"starting {cfg.servers} server(s) for {model_path} on {device}; logs in {self.log_dir}")
            self._wait_servers(deadline, rebind=True)
            if with_router:
                self.router = ManagedProcess(
                    "sglang-router", router_command(cfg, router, front, [s.url for s in self.servers],
                                                    free_ports(cfg.host, 1)[0], deadline - time.monotonic()),
                    {}, self.log_dir / "router.log", self._url)
                self.router.start()
                self._wait_router(deadline)
            _log(f"ready at {self._url} (workers {[s.url for s in self.servers]})")
        except BaseException:
            self.stop()
            raise
        return self

    def _server_argv(self, i: int, port: int) -> tuple[list[str], dict[str, str]]:
        return server_command(self.cfg, self.model_path, port, python=self._python, device=self._device,
                              weight_version=self.weight_version, gpus=self._slices[i])

    def stop(self) -> None:
        """Stop the router and every launched server; return once none of their processes is left.
        An external fleet is left alone."""
        with self._lock:
            procs = ([self.router] if self.router else []) + self.servers
            errors = []
            for p in procs:
                try:
                    p.stop(self.cfg.stop_grace_s)
                except FleetError as e:
                    errors.append(str(e))
            if procs:
                _log(f"stopped {len(self.servers)} server(s)" + (" and the router" if self.router else ""))
            self.servers, self.router = [], None
            if self.cfg.launch:
                self._url = None
            _LIVE.discard(self)
            if errors:
                raise FleetError("; ".join(errors))

    def close(self) -> None:
        self.stop()
        self.http.close()

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- health --------------------------------------------------------------------------------
    def _healthy(self, url: str) -> bool:
        try:
            return self.http.get(f"{url}/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _port_taken(self, i: int, s: ManagedProcess) -> bool:
        """With ``port: 0`` a port picked free may be taken before the server binds it (another program, or
        SGLang's own side ports): the server logs ``[Errno 98]`` and lingers. Restart it on a new free port
        (at most :data:`REBIND_TRIES` times) and return True."""
        if self.cfg.port != 0 or s.starts > REBIND_TRIES or BIND_ERROR not in s.log_tail():
            return False
        port = free_ports(self.cfg.host, 1)[0]
        _log(f"{s.name}: {s.url} was taken before it could bind; restarting it on port {port}")
        s.stop(self.cfg.stop_grace_s)
        s.argv, s.env = self._server_argv(i, port)
        s.url = f"http://{self.cfg.host}:{port}"
        if len(self.servers) == 1:         # no router: the server is the fleet's address
            self._url = s.url
        s.start()
        return True

    def _wait_servers(self, deadline: float, rebind: bool = False) -> None:
        """Wait until every server answers ``/health``; ``rebind`` (at start, before the router and any
        client know the URLs): a server whose port was taken is restarted on another."""
        pending = list(self.servers)
        while pending:
            for s in list(pending):
                if rebind and self._port_taken(self.servers.index(s), s):
                    continue
                if not s.alive():
                    raise FleetError(f"{s.name} exited before it was healthy: {s.describe()}")
                if self._healthy(s.url):
                    pending.remove(s)
            if pending and time.monotonic() > deadline:
                raise FleetError(f"SGLang server(s) not healthy within the time limit: "
                                 + "\n".join(s.describe() for s in pending))
            if pending:
                time.sleep(0.5)

    def _router_lists_healthy(self) -> tuple[bool, str]:
        try:
            r = self.http.get(f"{self.url}/workers", timeout=5.0)
            workers = r.json().get("workers", []) if r.status_code == 200 else []
        except (httpx.HTTPError, ValueError) as e:
            return False, repr(e)
        healthy = {w.get("url", "").rstrip("/") for w in workers if w.get("is_healthy")}
        want = {s.url for s in self.servers}
        return want <= healthy, f"healthy workers {sorted(healthy)}, expected {sorted(want)}"

    def _wait_router(self, deadline: float) -> None:
        last = ""
        while True:
            if not self.router.alive():
                raise FleetError(f"sglang-router exited before it listed its workers: {self.router.describe()}")
            ok, last = self._router_lists_healthy()
            if ok:
                return
            if time.monotonic() > deadline:
                raise FleetError(f"sglang-router did not list all workers healthy in time ({last}): "
                                 f"{self.router.describe()}")
            time.sleep(0.5)

    def wait_healthy(self, timeout_s: float) -> None:
        """Wait until :attr:`url` and every worker answer ``/health`` (launched: and the router
        lists them healthy), at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        if self.launched:
            self._wait_servers(deadline)
            if self.router:
                self._wait_router(deadline)
            return
        while True:
            try:
                pending = [u for u in {self.url, *self.worker_urls()} if not self._healthy(u)]
            except FleetError as e:
                pending = [f"{self.url} ({e})"]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise FleetError(f"SGLang fleet at {self.url} not healthy after {timeout_s} s: {pending}")
            time.sleep(0.5)

    def recover(self) -> None:
        """Bring the fleet back after a failure (see module doc), within ``cfg.recover_timeout_s``;
        raise :class:`FleetError` (or :class:`ServedModelChanged`) if it cannot."""
        with self._lock:
            deadline = time.monotonic() + self.cfg.recover_timeout_s
            if self.launched:
                for i, s in enumerate(self.servers):
                    if not s.alive():
                        _log(f"{s.name} at {s.url} died (exit code {s.proc.returncode}); restarting it with "
                             f"{self.model_path}")
                        s.stop(self.cfg.stop_grace_s)
                        s.argv, s.env = self._server_argv(i, int(s.url.rsplit(":", 1)[1]))
                        s.start()
                        self.restarts += 1
                if self.router is not None and not self.router.alive():
                    _log("sglang-router died; restarting it")
                    self.router.stop(self.cfg.stop_grace_s)
                    self.router.start()
                    self.restarts += 1
            self.wait_healthy(max(0.0, deadline - time.monotonic()))
            if self.expected is not None:
                self.check_serving(self.expected)

    # -- what is served --------------------------------------------------------------------------
    def model_info(self, worker_url: str) -> dict:
        try:
            r = self.http.get(f"{worker_url}/get_model_info", timeout=30.0)
            r.raise_for_status()
            return r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise FleetError(f"cannot ask {worker_url}/get_model_info what it serves: {e!r}") from e

    def served(self) -> dict[str, ServedModel]:
        """Worker URL -> what it serves (``model_path`` and ``weight_version`` of ``/get_model_info``)."""
        out = {}
        for u in self.worker_urls():
            info = self.model_info(u)
            out[u] = ServedModel(str(info.get("model_path")), info.get("weight_version"))
        return out

    def ensure_serving(self, model_path: str | os.PathLike, swap_weights: bool | None = None) -> ServedModel:
        """Make every worker serve ``model_path`` and return what they serve (recorded as
        :attr:`expected`: recovery and :meth:`check_serving` compare against it). A worker serving
        another model is swapped when ``swap_weights`` (default ``cfg.swap_weights``) is on, else
        :class:`ModelMismatch` names both models; workers serving it under different weight
        versions are swapped to one version (or refused the same way)."""
        swap = self.cfg.swap_weights if swap_weights is None else swap_weights
        model_path = str(model_path)
        with self._lock:
            served = self.served()
            wrong = {u: m for u, m in served.items() if not same_model(m.model_path, model_path)}
            if not wrong and len({m.weight_version for m in served.values()}) > 1:
                wrong = served
            if wrong and not swap:
                listing = "; ".join(f"{u} serves {m.model_path} (weight_version {m.weight_version})"
                                    for u, m in wrong.items())
                raise ModelMismatch(f"the stage's model is {model_path}, but {listing}. Set "
                                    f"<stage>.backend.swap_weights=true to swap the servers' weights, or serve "
                                    f"{model_path}")
            if wrong:
                version = checkpoint_version(model_path)
                for u in wrong:
                    self._swap(u, model_path, version)
                served = self.served()
            bad = {u: m for u, m in served.items() if not same_model(m.model_path, model_path)}
            if bad or len({m.weight_version for m in served.values()}) > 1:
                raise FleetError(f"after swapping to {model_path} the servers report "
                                 f"{ {u: m.as_dict() for u, m in served.items()} }")
            self.expected = ServedModel(model_path, next(iter(served.values())).weight_version)
            if self.launched:
                self.model_path, self.weight_version = model_path, self.expected.weight_version
            return self.expected

    def _swap(self, worker_url: str, model_path: str, version: str) -> None:
        info = self.model_info(worker_url)
        old_tok, new_tok = _tokenizer_digest(info.get("tokenizer_path")), _tokenizer_digest(model_path)
        if old_tok and new_tok and old_tok != new_tok:
            raise FleetError(f"{worker_url} cannot swap to {model_path}: its tokenizer differs from the one the "
                             f"server was launched with ({info.get('tokenizer_path')}); a weight swap keeps the "
                             f"tokenizer, so launch a server for {model_path} instead")
        _log(f"{worker_url}: swapping weights {info.get('model_path')} -> {model_path} (weight_version {version})")
        try:
            r = self.http.post(f"{worker_url}/update_weights_from_disk", timeout=self.cfg.timeout_s,
                               json={"model_path": model_path, "weight_version": version, "flush_cache": True})
            body = r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise FleetError(f"{worker_url}/update_weights_from_disk to {model_path} failed: {e!r}") from e
        if r.status_code != 200 or not body.get("success", False):
            raise FleetError(f"{worker_url}/update_weights_from_disk to {model_path} failed: HTTP {r.status_code} "
                             f"{body}")
        # stale radix-cache entries would serve the old model's KV: flush (400 while requests run)
        for _ in range(60):
            r = self.http.post(f"{worker_url}/flush_cache", timeout=30.0)
            if r.status_code == 200:
                return
            time.sleep(0.5)
        raise FleetError(f"{worker_url}/flush_cache after the swap to {model_path} kept failing: "
                         f"HTTP {r.status_code} {r.text[:200]}")

    def check_serving(self, expected: ServedModel | None = None) -> None:
        """Raise :class:`ServedModelChanged` if a worker no longer serves ``expected`` (default:
        what :meth:`ensure_serving` recorded): the stage must not be marked finished."""
        expected = expected or self.expected
        if expected is None:
            raise FleetError("check_serving() before ensure_serving()")
        for u, m in self.served().items():
            if not same_model(m.model_path, expected.model_path) or m.weight_version != expected.weight_version:
                raise ServedModelChanged(f"{u} now serves {m.model_path} (weight_version {m.weight_version}); the "
                                         f"stage started on {expected.model_path} (weight_version "
                                         f"{expected.weight_version})")

    def preflight(self, model_path: str | os.PathLike) -> None:
        """Cheap checks before a run spends compute: launched fleets: SGLang's python imports sglang,
        the router exists when needed, enough GPUs; external fleets: reachable, and serving
        ``model_path`` (or ``swap_weights`` on). Raises :class:`FleetError`."""
        cfg = self.cfg
        if cfg.launch:
            python = resolve_python(cfg)
            r = subprocess.run([python, "-c", "import sglang, sgl_kernel"], capture_output=True, text=True)
            if r.returncode != 0:
                raise FleetError(f"{python} cannot import sglang (scripts/setup.sh --sglang, or set backend.python):"
                                 f"\n{r.stderr[-2000:]}")
            if cfg.servers > 1 and resolve_router(cfg, python) is None:
                raise FleetError("backend.servers > 1 needs sglang-router (or backend.router_path)")
            if resolve_device(cfg) == "cuda" and len(visible_gpus()) < cfg.servers * cfg.tp * cfg.dp:
                raise FleetError(f"backend.servers x tp x dp = {cfg.servers * cfg.tp * cfg.dp} GPUs needed, "
                                 f"{len(visible_gpus())} visible")
            return
        self.wait_healthy(10.0)
        wrong = {u: m for u, m in self.served().items() if not same_model(m.model_path, model_path)}
        if wrong and not cfg.swap_weights:
            raise ModelMismatch(f"the stage's model is {model_path}, but "
                                + "; ".join(f"{u} serves {m.model_path}" for u, m in wrong.items())
                                + " (set <stage>.backend.swap_weights=true to swap)")


class FleetBackend(SGLangClient):
    """The generation backend of a stage on SGLang: an :class:`SGLangClient` (settings from ``cfg``,
    default the fleet's) bound to a fleet that was checked to serve :attr:`served_model`. Before each
    batch a launched server or router that died is restarted (:meth:`Fleet.recover`), even when the
    router hid its failure by sending the requests elsewhere. ``check()``: raise
    :class:`ServedModelChanged` if a server changed model since; ``close()`` also stops the fleet if
    this backend launched it."""

    def __init__(self, fleet: Fleet, served_model: ServedModel, own_fleet: bool, cfg: BackendConfig | None = None):
        c = cfg or fleet.cfg
        super().__init__(SGLangClientConfig(fleet.url, c.concurrency, c.timeout_s, c.max_retries,
                                            health_timeout_s=c.launch_timeout_s,
                                            recover_timeout_s=c.recover_timeout_s, max_recoveries=c.max_recoveries),
                         wait=False, recover=fleet.recover, expect_weight_version=served_model.weight_version)
        self.fleet, self.served_model, self.own_fleet = fleet, served_model, own_fleet

    def generate(self, requests: list[GenRequest]) -> list[list[dict]]:
        f = self.fleet
        if f.launched and not all(p.alive() for p in f.servers + ([f.router] if f.router else [])):
            try:
                self._recover(self.recoveries)
            except Exception as e:  # noqa: BLE001 - the stage sees one kind of error
                raise SGLangError(f"{f.url}: a launched process died; recovering the server failed: {e}") from e
        return super().generate(requests)

    def check(self) -> None:
        self.fleet.check_serving(self.served_model)

    def __enter__(self) -> "FleetBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.own_fleet:
                self.fleet.close()


def open_backend(cfg: BackendConfig, model_path: str | os.PathLike, fleet: Fleet | None = None,
                 log_dir: str | os.PathLike | None = None) -> FleetBackend:
    """The backend of one stage on SGLang serving ``model_path``: with ``fleet`` given, that one
    (not stopped at close); else a new :class:`Fleet` of ``cfg``, launched here if ``cfg.launch``
    (and stopped by the backend's ``close()``). Waits for health, then
    :meth:`Fleet.ensure_serving` (swap or :class:`ModelMismatch`) before any request is sent. The
    client's settings (concurrency, timeouts, retries, recoveries) come from ``cfg``."""
    own = fleet is None
    fleet = fleet or Fleet(cfg, log_dir)
    try:
        if own and cfg.launch:
            fleet.start(model_path)
        else:
            fleet.wait_healthy(cfg.launch_timeout_s)
        served = fleet.ensure_serving(model_path, cfg.swap_weights)
        return FleetBackend(fleet, served, own, cfg)
    except BaseException:
        if own:
            fleet.close()
        raise


@contextmanager
def serving(cfg: BackendConfig, model_path: str | os.PathLike, fleet: Fleet | None = None,
            log_dir: str | os.PathLike | None = None) -> Iterator[FleetBackend]:
    """``with serving(stage.backend, model) as backend:`` run the stage with ``backend=backend``;
    ``backend.served_model.as_dict()`` goes into the stage's stamp under ``served_model``. On a normal
    exit the servers must still serve it (else :class:`ServedModelChanged`: do not mark the stage
    finished); a fleet launched here is stopped in every case."""
    backend = open_backend(cfg, model_path, fleet, log_dir)
    try:
        yield backend
        backend.check()
    finally:
        backend.close()


__all__ = ["CPU_SERVER_ARGS", "FLEET_FIELDS", "Fleet", "FleetBackend", "FleetError", "ModelMismatch", "ServedModel",
           "ServedModelChanged", "SGLangError", "checkpoint_version", "open_backend", "router_command",
           "same_model", "server_command", "serving"]
