"""data.s3 / data.download against a real S3 server (SeaweedFS, see tests/s3_server.py).

Buckets hold real JPEG files laid out like the birds dataset, with class folder names that
contain double spaces, '&', "'" and '-'.
"""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from data import s3
from tests import s3_server as s3_server_module

REPO = Path(__file__).resolve().parent.parent
PREFIX = "datasets/birds"
CLASSES = ("BLACK  THROATED SPARROW", "BLACK & YELLOW BROADBILL", "ANNA'S HUMMINGBIRD",
           "RED-HEADED WOODPECKER")
MANY_FILES = 600


def _jpegs(count: int, size: int, seed: int) -> list[bytes]:
    """`count` real JPEG crops of scikit-learn's two sample photographs."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    images = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        image = images[index % len(images)]
        y = int(rng.integers(0, image.shape[0] - size))
        x = int(rng.integers(0, image.shape[1] - size))
        buffer = io.BytesIO()
        Image.fromarray(image[y:y + size, x:x + size]).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _tree(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under root."""
    return {path.relative_to(root).as_posix(): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file()}


def _temp_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if s3.TEMP_PATTERN.match(path.name)]


def _complete_files(root: Path) -> int:
    count = 0
    for _, _, files in os.walk(root):
        count += sum(1 for name in files if not s3.TEMP_PATTERN.match(name))
    return count


def _creds(server) -> dict:
    return {"endpoint_url": server.endpoint_url, "key": server.key, "secret": server.secret,
            "progress": False}


def _cli_env(server=None, *, credentials: bool = True) -> dict:
    """The environment for a CLI run: no AWS settings from this machine; the test server's
    credentials through the standard variables when asked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_EC2_METADATA_DISABLED="true", PYTHONUNBUFFERED="1")
    if server is not None and credentials:
        env.update(AWS_ACCESS_KEY_ID=server.key, AWS_SECRET_ACCESS_KEY=server.secret)
    return env


def _cli(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.download", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("download:")]


@pytest.fixture(scope="module")
def birds_local(tmp_path_factory) -> Path:
    """train|valid|test/<CLASS>/*.jpg, real JPEGs of varied sizes."""
    root = tmp_path_factory.mktemp("birds-source")
    images = iter(_jpegs(3 * len(CLASSES) * 4, 64, seed=0) + _jpegs(6, 160, seed=1))
    for split, per_class in (("train", 4), ("valid", 2), ("test", 2)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                (folder / f"{index + 1}.jpg").write_bytes(next(images))
    return root


@pytest.fixture(scope="module")
def birds_buckets(s3_server, birds_local) -> dict[str, bytes]:
    """'birds-public' (anonymous read through a bucket policy) and 'birds-private', same files."""
    s3_server.make_bucket("birds-public", public=True)
    s3_server.make_bucket("birds-private")
    s3_server.upload_tree(birds_local, "birds-public", PREFIX)
    keys = s3_server.upload_tree(birds_local, "birds-private", PREFIX)
    s3_server.put_objects("birds-private", {"datasets/other/unrelated.jpg": b"not this"})
    assert any("  " in key for key in keys) and any("&" in key for key in keys)
    return _tree(birds_local)


# ---------------------------------------------------------------- reading, credentials


def test_public_bucket_anonymous_read_then_incremental(s3_server, birds_buckets, tmp_path):
    dest = tmp_path / "birds"
    summary = s3.sync(f"s3://birds-public/{PREFIX}", str(dest), anon=True,
                      endpoint_url=s3_server.endpoint_url, progress=False)
    assert _tree(dest) == birds_buckets  # byte-exact contents and folder names
    assert sorted(os.listdir(dest / "train")) == sorted(CLASSES)
    assert (summary.downloaded, summary.skipped, summary.failed, summary.refused) == (
        len(birds_buckets), 0, 0, [])
    assert summary.bytes == sum(len(data) for data in birds_buckets.values())

    # Second run: nothing downloaded. Then a changed file (same size, other bytes), a
    # truncated file and a stale temporary file from a killed run.
    again = s3.sync(f"s3://birds-public/{PREFIX}/", str(dest), anon=True,
                    endpoint_url=s3_server.endpoint_url, progress=False)
    assert (again.downloaded, again.skipped, again.bytes) == (0, len(birds_buckets), 0)
    changed = dest / "train" / CLASSES[0] / "1.jpg"
    changed.write_bytes(bytes(len(changed.read_bytes())))
    truncated = dest / "valid" / CLASSES[1] / "2.jpg"
    truncated.write_bytes(truncated.read_bytes()[:100])
    stale = dest / "test" / CLASSES[2] / ".1.jpg.part-0123abcd"
    stale.write_bytes(b"partial")
    third = s3.sync(f"s3://birds-public/{PREFIX}", str(dest), anon=True,
                    endpoint_url=s3_server.endpoint_url, progress=False)
    assert (third.downloaded, third.skipped) == (2, len(birds_buckets) - 2)
    assert _tree(dest) == birds_buckets
    assert not _temp_files(dest)


def test_private_bucket_with_credentials(s3_server, birds_buckets, tmp_path):
    summary = s3.sync(f"s3://birds-private/{PREFIX}", str(tmp_path), workers=4,
                      **_creds(s3_server))
    assert summary.downloaded == len(birds_buckets) and summary.ok
    assert _tree(tmp_path) == birds_buckets  # the sibling prefix 'datasets/other' not copied


def test_private_bucket_refuses_anonymous(s3_server, birds_buckets, tmp_path):
    url = f"s3://birds-private/{PREFIX}"
    with pytest.raises(s3.S3SyncError) as caught:
        s3.sync(url, str(tmp_path / "d"), anon=True, endpoint_url=s3_server.endpoint_url,
                progress=False)
    message = str(caught.value)
    assert message.startswith(f"{url}/:") and "\n" not in message
    assert "access denied to anonymous requests" in message
    assert _complete_files(tmp_path) == 0


def test_wrong_secret_refused_without_printing_it(s3_server, birds_buckets, tmp_path):
    url = f"s3://birds-private/{PREFIX}"
    wrong = "wrong-secret-" + "x" * 20
    with pytest.raises(s3.S3SyncError) as caught:
        s3.sync(url, str(tmp_path), endpoint_url=s3_server.endpoint_url, key=s3_server.key,
                secret=wrong, progress=False)
    message = str(caught.value)
    assert url in message and "secret key does not match" in message
    assert wrong not in message and s3_server.key not in message and "\n" not in message


# ---------------------------------------------------------------- interruption and resume


@pytest.fixture(scope="module")
def many_files(s3_server) -> dict[str, bytes]:
    s3_server.make_bucket("many")
    objects = {f"set/{'train' if i % 5 else 'valid'}/CLASS  {i % 7} & 'x'/{i:05d}.jpg": data
               for i, data in enumerate(_jpegs(MANY_FILES, 48, seed=2))}
    s3_server.put_objects("many", objects)
    return {key[len("set/"):]: data for key, data in objects.items()}


def test_cli_killed_midway_then_resumed(s3_server, many_files, tmp_path):
    dest = tmp_path / "many"
    process = subprocess.Popen(
        [sys.executable, "-m", "data.download", "--source=s3://many/set", f"--dest={dest}",
         f"--s3_endpoint_url={s3_server.endpoint_url}", "--workers=2", "--no_progress"],
        cwd=REPO, env=_cli_env(s3_server), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while _complete_files(dest) < 50 and process.poll() is None:
            assert time.monotonic() < deadline, "the CLI downloaded nothing within 60 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, "the sync finished before it could be killed"
    landed = _complete_files(dest)
    assert 50 <= landed < len(many_files)
    # Whatever landed under its real name is complete.
    for path in dest.rglob("*.jpg"):
        assert path.read_bytes() == many_files[path.relative_to(dest).as_posix()]
    # As if the kill had happened mid-file, whatever the timing was.
    (dest / "train" / ".straggler.jpg.part-deadbeef").write_bytes(b"half a file")

    summary = s3.sync("s3://many/set", str(dest), **_creds(s3_server))
    assert summary.skipped == landed
    assert summary.downloaded == len(many_files) - landed and summary.failed == 0
    assert not _temp_files(dest)
    assert _tree(dest) == many_files


class CuttingProxy:
    """A TCP proxy to a local port that goes away after forwarding `budget` response bytes:
    it closes every connection (mid-response) and stops listening, like a server that died."""

    def __init__(self, target_port: int, budget: int):
        self.target_port, self.budget, self.sent = target_port, budget, 0
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_off = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut_off.is_set():
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, response: bool) -> None:
        try:
            while data := source.recv(65536):
                if response:
                    with self.lock:
                        data = data[:max(0, self.budget - self.sent)]
                        self.sent += len(data)
                    if data:
                        sink.sendall(data)
                    if self.sent >= self.budget:
                        self.cut()
                        return
                else:
                    sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.cut_off.set()
        with self.lock:
            sockets, self.sockets = self.sockets, []
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def test_transfer_cut_off_reports_and_resumes(s3_server, tmp_path):
    rng = np.random.default_rng(3)
    objects = {f"big/part {i:02d}.bin": rng.bytes(200_000) for i in range(12)}
    s3_server.make_bucket("cutoff")
    s3_server.put_objects("cutoff", objects)
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    proxy = CuttingProxy(port, budget=1_100_000)  # about 5 of the 12 files get through
    dest = tmp_path / "cut"
    started = time.monotonic()
    try:
        with pytest.raises(s3.S3SyncError) as caught:
            s3.sync("s3://cutoff/big", str(dest), workers=2, endpoint_url=f"http://127.0.0.1:"
                    f"{proxy.port}", key=s3_server.key, secret=s3_server.secret,
                    progress=False)
    finally:
        proxy.cut()
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert elapsed < 15, message
    assert message.startswith("s3://cutoff/big/: stopped after") and "\n" not in message
    assert f"127.0.0.1:{proxy.port}" in message
    partial = caught.value.summary
    assert partial is not None and 0 < partial.downloaded < len(objects)
    assert not _temp_files(dest)
    expected = {key[len("big/"):]: data for key, data in objects.items()}
    landed = _tree(dest)
    assert len(landed) == partial.downloaded
    assert all(expected[name] == data for name, data in landed.items())

    summary = s3.sync("s3://cutoff/big", str(dest), **_creds(s3_server))
    assert (summary.skipped, summary.downloaded) == (len(landed), len(objects) - len(landed))
    assert _tree(dest) == expected


# ---------------------------------------------------------------- safety


@pytest.mark.parametrize("key", [
    "p/../escape.jpg",
    "p/a/../../escape.jpg",
    "p/..",
    "p//etc/passwd",
    "p/./a.jpg",
    "p/..\\..\\escape.jpg",
    "p/a\\b.jpg",
    "p/a\0b.jpg",
    "p/",
    "other/a.jpg",
    "p/train/.a.jpg.part-0123abcd",
])
@pytest.mark.quick
def test_unsafe_keys_refused(key, tmp_path):
    with pytest.raises(s3.UnsafeKeyError):
        s3.local_path_for_key("p/", key, str(tmp_path))


@pytest.mark.quick
def test_absolute_keys_refused_with_empty_prefix(tmp_path):
    for key in ("/etc/passwd", "//etc/passwd", "../x", "a/../../x"):
        with pytest.raises(s3.UnsafeKeyError):
            s3.local_path_for_key("", key, str(tmp_path))


@pytest.mark.quick
def test_safe_keys_map_byte_exact(tmp_path):
    name = "train/BLACK  THROATED & ANNA'S-X/00 1.jpg"
    for prefix in ("datasets/birds", "datasets/birds/"):
        assert s3.local_path_for_key(prefix, f"datasets/birds/{name}", str(tmp_path)) == (
            os.path.join(str(tmp_path), *name.split("/")))
    assert s3.local_path_for_key("", "..a/b..", str(tmp_path)) == str(tmp_path / "..a" / "b..")


def test_refused_key_reported_by_sync_and_cli(s3_server, tmp_path):
    s3_server.make_bucket("tricky")
    # SeaweedFS refuses '..' keys and rewrites '\' and '//', but stores this one.
    s3_server.put_objects("tricky", {"d/ok.jpg": b"fine", "d/.ok.jpg.part-0123abcd": b"bad"})
    summary = s3.sync("s3://tricky/d", str(tmp_path / "lib"), **_creds(s3_server))
    assert summary.refused == ["d/.ok.jpg.part-0123abcd"] and summary.downloaded == 1
    assert not summary.ok and _tree(tmp_path / "lib") == {"ok.jpg": b"fine"}

    result = _cli("--source=s3://tricky/d", f"--dest={tmp_path / 'cli'}",
                  f"--s3_endpoint_url={s3_server.endpoint_url}", env=_cli_env(s3_server))
    assert result.returncode == 1
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "refused 1 keys" in lines[0] and ".ok.jpg.part" in lines[0]


# ---------------------------------------------------------------- errors


def test_server_down_reported_quickly(tmp_path):
    port = s3_server_module.free_ports(1)[0]  # nothing listens there
    started = time.monotonic()
    with pytest.raises(s3.S3SyncError) as caught:
        s3.sync("s3://birds/x", str(tmp_path), endpoint_url=f"http://127.0.0.1:{port}",
                key="k" * 10, secret="s" * 20, progress=False)
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert message.startswith("s3://birds/x/:") and f"cannot connect to http://127.0.0.1:{port}" \
        in message


def test_missing_bucket_reported_quickly(s3_server, tmp_path):
    started = time.monotonic()
    with pytest.raises(s3.S3SyncError) as caught:
        s3.sync("s3://no-such-bucket/x", str(tmp_path), **_creds(s3_server))
    assert time.monotonic() - started < 15
    assert str(caught.value) == (f"s3://no-such-bucket/x/: bucket 'no-such-bucket' does not "
                                 f"exist at {s3_server.endpoint_url}")


def test_empty_prefix_reported(s3_server, birds_buckets, tmp_path):
    with pytest.raises(s3.S3SyncError) as caught:
        s3.sync("s3://birds-private/datasets/bird", str(tmp_path), **_creds(s3_server))
    assert str(caught.value).startswith("s3://birds-private/datasets/bird/: no objects under "
                                        "this prefix")


def test_per_file_failure_counted_and_others_kept(s3_server, birds_buckets, tmp_path):
    blocked = f"train/{CLASSES[3]}/2.jpg"
    (tmp_path / blocked / "occupied").mkdir(parents=True)  # a folder where a file must go
    summary = s3.sync(f"s3://birds-private/{PREFIX}", str(tmp_path), **_creds(s3_server))
    assert summary.failed == 1 and list(summary.failures) == [f"{PREFIX}/{blocked}"]
    assert summary.downloaded == len(birds_buckets) - 1
    assert not _temp_files(tmp_path)


@pytest.mark.quick
def test_weed_missing_fails_with_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(s3_server_module, "weed_binary", lambda: tmp_path / "weed")
    with pytest.raises(FileNotFoundError, match="install the test extra"):
        s3_server_module.start_server(tmp_path)


# ---------------------------------------------------------------- CLI


def test_cli_success_anonymous_and_with_credentials(s3_server, birds_buckets, tmp_path):
    public = _cli(f"--source=s3://birds-public/{PREFIX}", f"--dest={tmp_path / 'pub'}",
                  "--s3_anon", f"--s3_endpoint_url={s3_server.endpoint_url}",
                  env=_cli_env(s3_server, credentials=False))
    assert public.returncode == 0, public.stderr
    assert f"downloaded {len(birds_buckets)}, skipped 0, failed 0" in public.stderr
    assert _tree(tmp_path / "pub") == birds_buckets

    private = _cli(f"--source=s3://birds-private/{PREFIX}", f"--dest={tmp_path / 'priv'}",
                   f"--s3_endpoint_url={s3_server.endpoint_url}", "--workers=3",
                   "--no_progress", env=_cli_env(s3_server))
    assert private.returncode == 0, private.stderr
    assert private.stderr.count("downloaded") == 1 and "Traceback" not in private.stderr
    assert _tree(tmp_path / "priv") == birds_buckets
    assert s3_server.secret not in private.stderr + private.stdout


@pytest.mark.parametrize("case", ["anonymous_private", "wrong_secret", "no_credentials",
                                  "server_down", "missing_bucket"])
def test_cli_errors_one_line(case, s3_server, birds_buckets, tmp_path):
    url = f"s3://birds-private/{PREFIX}"
    endpoint = s3_server.endpoint_url
    env = _cli_env(s3_server)
    extra = []
    expected = {"anonymous_private": "access denied to anonymous requests",
                "wrong_secret": "secret key does not match",
                "no_credentials": "no AWS credentials found",
                "server_down": "cannot connect to",
                "missing_bucket": "does not exist"}[case]
    if case == "anonymous_private":
        extra = ["--s3_anon"]
    elif case == "wrong_secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret-at-all"
    elif case == "no_credentials":
        env = _cli_env(None)
    elif case == "server_down":
        endpoint = f"http://127.0.0.1:{s3_server_module.free_ports(1)[0]}"
    elif case == "missing_bucket":
        url = "s3://missing-bucket/x"
    started = time.monotonic()
    result = _cli(f"--source={url}", f"--dest={tmp_path}", f"--s3_endpoint_url={endpoint}",
                  *extra, env=env)
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"download: {url.rstrip('/')}/:"), lines
    assert expected in lines[0]
    assert "not-the-secret-at-all" not in lines[0] and s3_server.secret not in lines[0]


def test_cli_failed_files_exit_nonzero(s3_server, birds_buckets, tmp_path):
    blocked = f"valid/{CLASSES[0]}/1.jpg"
    (tmp_path / blocked / "occupied").mkdir(parents=True)
    result = _cli(f"--source=s3://birds-private/{PREFIX}", f"--dest={tmp_path}",
                  f"--s3_endpoint_url={s3_server.endpoint_url}", "--no_progress",
                  env=_cli_env(s3_server))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "1 of" in lines[0] and f"{PREFIX}/{blocked}" in lines[0]


@pytest.mark.parametrize("args", [
    ["--source=http://bucket/x", "--dest=d"],
    ["--source=s3://", "--dest=d"],
    ["--source=s3://bucket/x"],
    ["--source=s3://bucket/x", "--dest=d", "--workers=0"],
])
@pytest.mark.quick
def test_cli_usage_errors(args, capsys):
    from data import download
    with pytest.raises(SystemExit) as caught:
        download.main(args)
    assert caught.value.code == 2
    assert "usage:" in capsys.readouterr().err
