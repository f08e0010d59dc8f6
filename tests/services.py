"""Real services for end-to-end tests, on 127.0.0.1, each stopped by its PID."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{what} not ready after {timeout} s")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return 200 <= r.status < 300


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 15) -> None:
    """Stop a process (SIGINT first: Prefect workers ignore SIGTERM), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig) if _own_group(proc) else proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL) if _own_group(proc) else proc.kill()
        proc.wait(10)


def _own_group(proc: subprocess.Popen) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


def start(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start a service in its own process group (so its children are stopped with it)."""
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """``prefect server start`` with its own PREFECT_HOME; yields the environment that points at it."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                 home / "server.log")
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/api/health"), 90, "prefect server", proc)
        yield env
    finally:
        stop(proc)


@contextlib.contextmanager
def dask_processes(n_workers: int, log_dir: Path, nthreads: int = 1) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A real ``dask scheduler`` and ``n_workers`` ``dask worker`` processes on 127.0.0.1."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sched = start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                  env, log_dir / "scheduler.log")
    workers: list[subprocess.Popen] = []
    try:
        wait_for(lambda: port_open(port), 60, "dask scheduler", sched)
        for i in range(n_workers):
            workers.append(start([str(BIN / "dask"), "worker", address, "--nthreads", str(nthreads), "--nworkers", "1",
                                  "--no-dashboard", "--name", f"w{i}", "--host", "127.0.0.1"], env,
                                 log_dir / f"worker{i}.log"))
        from distributed import Client

        with Client(address, timeout="30s") as c:
            c.wait_for_workers(n_workers, timeout=90)
        yield address, workers
    finally:
        for w in workers:
            stop(w, signal.SIGTERM)
        stop(sched, signal.SIGTERM)


@contextlib.contextmanager
def s3_server(log_dir: Path) -> Iterator[dict[str, str]]:
    """moto's S3 API server on loopback; yields the standard AWS variables that point at it."""
    port = free_port()
    proc = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], dict(os.environ),
                 log_dir / "moto.log")
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    try:
        wait_for(lambda: port_open(port), 60, "moto_server", proc)
        yield env
    finally:
        stop(proc, signal.SIGTERM)


@contextlib.contextmanager
def aws_environment(aws: dict[str, str]) -> Iterator[None]:
    """The AWS variables of an endpoint set in this process (s3fs reads them when a filesystem is made;
    its cached instances are dropped on the way in and out), the previous values restored after."""
    import s3fs

    saved = {k: os.environ.get(k) for k in aws}
    os.environ.update(aws)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: the faults a :class:`FaultProxy` can inject, by name: an S3 error answer (status, code), a connection
#: reset (no answer, RST), or a time-out (no answer until the client gave up)
FAULTS: dict[str, tuple[str, int, str]] = {
    "500": ("status", 500, "InternalError"),
    "502": ("status", 502, "BadGateway"),
    "503": ("status", 503, "SlowDown"),
    "504": ("status", 504, "GatewayTimeout"),
    "403": ("status", 403, "AccessDenied"),
    "reset": ("reset", 0, ""),
    "timeout": ("timeout", 0, ""),
}


class FaultProxy:
    """A real S3 endpoint with faults: an HTTP proxy in front of moto that answers chosen requests with a
    fault and passes every other request through unchanged.

    ``url`` goes where the endpoint would (``AWS_ENDPOINT_URL``). Faults (:data:`FAULTS`): an S3 error
    answer (any status: 5xx, a 403 that clears on the next try), a connection reset (the socket closed with
    an RST, no answer) or a time-out (no answer for :attr:`hold` seconds, then the connection closed — set
    the clients' read time-outs below it). Two ways to inject them:

    * :meth:`fail`: a rule matching a method and a regular expression searched in the path and query, firing
      ``times`` times (None: until :meth:`clear`);
    * :meth:`chaos`: each request not matched by a rule fails with probability ``rate``, with a fault drawn
      from a weighted mix (seeded).

    ``log`` keeps (method, path, status) of every request (status 0: no answer), ``injected`` counts the
    faults by name, ``requests`` counts every request.
    """

    def __init__(self, upstream: str, hold: float = 4.0) -> None:
        import collections
        import http.client
        import http.server
        import re
        import threading
        import urllib.parse

        self.upstream = urllib.parse.urlsplit(upstream)
        self.hold = hold
        self.rules: list[list] = []
        self.log: list[tuple[str, str, int]] = []
        self.injected: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self._chaos: tuple[float, list[str], list[float], str | None] | None = None
        self._random = random.Random(0)
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _fault(self) -> tuple[str, str, int, str] | None:
                with proxy._lock:
                    proxy.requests += 1
                    for rule in proxy.rules:
                        method, pattern, fault, left = rule
                        if method in (self.command, "*") and re.search(pattern, self.path) and left != 0:
                            if left is not None:
                                rule[3] = left - 1
                            return fault
                    if proxy._chaos is not None:
                        rate, names, weights, skip = proxy._chaos
                        if (skip is None or not re.search(skip, self.path)) and proxy._random.random() < rate:
                            name = proxy._random.choices(names, weights)[0]
                            return (name, *FAULTS[name])
                return None

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = self._fault()
                if fault is not None:
                    name, kind, status, code = fault
                    with proxy._lock:
                        proxy.injected[name] += 1
                        proxy.log.append((self.command, self.path, status))  # before answering: the client goes on
                    if kind == "timeout":
                        time.sleep(proxy.hold)
                    if kind in ("reset", "timeout"):
                        self.close_connection = True
                        with contextlib.suppress(OSError):  # an RST, not a clean close
                            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            self.connection.close()
                        return
                    xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected "
                           f"{code}</Message><RequestId>fault</RequestId></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                with proxy._lock:
                    proxy.log.append((self.command, self.path, resp.status))
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length", "server",
                                         "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else
                                                       resp.getheader("Content-Length") or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:  # a reset we made, or a client gone
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def fail(self, method: str, pattern: str, status: int = 500, code: str = "InternalError",
             times: int | None = None, fault: str | None = None) -> None:
        """Answer ``method`` requests whose path matches ``pattern`` with ``status``/``code``, or with the
        named ``fault`` of :data:`FAULTS` ("reset", "timeout", "502", …)."""
        if fault is not None:
            answer = (fault, *FAULTS[fault])
        else:
            answer = (next((n for n, f in FAULTS.items() if f == ("status", status, code)), f"{status} {code}"),
                      "status", status, code)
        with self._lock:
            self.rules.append([method, pattern, answer, times])

    def chaos(self, rate: float, mix: dict[str, float], seed: int = 0, skip: str | None = None) -> None:
        """From now on fail each request (not matched by a rule; not matching ``skip``) with probability
        ``rate``, with a fault drawn from ``mix`` (fault name → weight). ``rate`` 0 stops it."""
        with self._lock:
            self._random = random.Random(seed)
            self._chaos = (rate, list(mix), list(mix.values()), skip) if rate > 0 else None

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self._chaos = None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def faulty_s3(log_dir: Path, client_retries: bool = False, hold: float = 4.0
              ) -> Iterator[tuple[dict[str, str], FaultProxy]]:
    """moto's S3 server behind a :class:`FaultProxy`; yields the AWS variables that point at the proxy and
    the proxy.

    Default: one attempt per request, so an injected fault is seen at once, not retried away. With
    ``client_retries`` the storage clients keep their own retries (botocore's, GDAL's: what a deployment
    has), and their read time-outs are set below the proxy's ``hold`` so an injected time-out is one."""
    with s3_server(log_dir) as aws:
        proxy = FaultProxy(aws["AWS_ENDPOINT_URL"], hold=hold)
        timeout = max(1, int(hold / 2))
        env = {**aws, "AWS_ENDPOINT_URL": proxy.url}
        if client_retries:
            env.update(FSSPEC_S3=json.dumps({"config_kwargs": {"read_timeout": timeout, "connect_timeout": timeout}}),
                       GDAL_HTTP_TIMEOUT=str(timeout))
        else:
            env.update(AWS_MAX_ATTEMPTS="1", GDAL_HTTP_MAX_RETRY="0")
        try:
            yield env, proxy
        finally:
            proxy.close()


def _postgres_bin() -> Path | None:
    """PostgreSQL's server programs, when PostgreSQL and PostGIS are installed (.ci/run installs them)."""
    import glob

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        version = Path(d).parent.name
        if Path(d, "initdb").exists() and glob.glob(f"/usr/share/postgresql/{version}/extension/postgis.control"):
            return Path(d)
    return None


def stac_api_available() -> str | None:
    """Why :func:`stac_api` cannot start here, or None when it can."""
    if _postgres_bin() is None:
        return "PostgreSQL with PostGIS is not installed (apt-get install postgresql postgresql-15-postgis-3)"
    if not (BIN / "pypgstac").exists():
        return "pypgstac is not installed"
    return None


@contextlib.contextmanager
def stac_api(log_dir: Path) -> Iterator[str]:
    """A real STAC API on loopback: stac-fastapi-pgstac (uvicorn) over PostgreSQL with PostGIS and pgstac
    (``pypgstac migrate``), transactions enabled; yields its landing-page URL. Both stopped by PID.

    PostgreSQL refuses to run as root: as root (CI) its programs run as the ``postgres`` user
    (``setpriv``), on a data folder outside pytest's private temporary folders.
    """
    import shutil
    import tempfile

    pg_bin = _postgres_bin()
    assert pg_bin is not None, stac_api_available()
    data = Path(tempfile.mkdtemp(prefix="segpipe-pgstac-"))
    as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(data, "postgres", "postgres")
    pg: subprocess.Popen | None = None
    try:
        subprocess.run([*as_postgres, str(pg_bin / "initdb"), "-D", str(data / "db"), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        port = free_port()
        pg = start([*as_postgres, str(pg_bin / "postgres"), "-D", str(data / "db"), "-p", str(port), "-k", str(data),
                    "-h", "127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off"], dict(os.environ),
                   log_dir / "postgres.log")
        wait_for(lambda: port_open(port), 60, "postgres", pg)
        dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        migrate = subprocess.run([str(BIN / "pypgstac"), "migrate", "--dsn", dsn], capture_output=True, text=True,
                                 timeout=300)
        assert migrate.returncode == 0, migrate.stderr[-2000:]
        api_port = free_port()
        env = {**os.environ, "PGUSER": "postgres", "PGPASSWORD": "unused", "PGHOST": "127.0.0.1", "PGPORT": str(port),
               "PGDATABASE": "postgres", "ENABLE_TRANSACTIONS_EXTENSIONS": "true"}
        api = start([sys.executable, "-m", "uvicorn", "stac_fastapi.pgstac.app:create_app", "--factory", "--host",
                     "127.0.0.1", "--port", str(api_port)], env, log_dir / "stac-api.log")
        url = f"http://127.0.0.1:{api_port}"
        try:
            wait_for(lambda: http_ok(url + "/"), 90, "stac-fastapi-pgstac", api)
            yield url
        finally:
            stop(api, signal.SIGTERM)
    finally:
        if pg is not None:
            stop(pg, signal.SIGINT)  # PostgreSQL's fast shutdown
        shutil.rmtree(data, ignore_errors=True)


def stac_post(url: str, path: str, doc: dict, method: str = "POST") -> dict:
    """One call of a STAC API's transactions extension (create a collection or an item)."""
    import json

    req = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(doc).encode(), method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"{}")
