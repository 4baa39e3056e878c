"""Copy a dataset from S3 (or any S3-compatible server) to a local folder, incrementally.

``sync("s3://BUCKET/PREFIX", DEST)`` copies every object under the prefix to
``DEST/<key relative to the prefix>``, keeping folder names byte-exact. It is safe to interrupt
and to run again:

* a file already present with the object's size (and MD5, when the ETag is a plain MD5) is
  skipped;
* each file is written to ``.NAME.part-XXXXXXXX`` in its final folder and renamed into place
  only when complete, so a file under its real name is always whole; temporary files left by a
  killed run are removed by the next run (and hidden from the dataset scanner meanwhile);
* keys that would land outside DEST are refused, not written (see `local_path_for_key`).

Errors that stop the whole sync (unreachable endpoint, missing bucket, access denied, empty
prefix, connection lost mid-way) raise `S3SyncError`, whose ``str()`` is one line naming the URL
and the cause; files already downloaded are kept. Failures of single objects are counted in the
returned `SyncSummary` and do not stop the others. Credentials are never printed.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import secrets
import sys
import time

from data.files import atomic_write_text, fsync_path
from data.progress import Progress

CHUNK_SIZE = 1 << 20
TEMP_PATTERN = re.compile(r"^\..*\.part-[0-9a-f]{8}\Z", re.DOTALL)
PLAIN_MD5_ETAG = re.compile(r"^[0-9a-fA-F]{32}\Z")
# Consecutive transfer failures (with no success in between) after which the connection is
# considered lost and the sync stops instead of failing every remaining file slowly.
MAX_CONSECUTIVE_TRANSFER_FAILURES = 3
# Local errors after which no other file can be written either.
FATAL_LOCAL_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)})


class S3SyncError(Exception):
    """The sync could not run or was cut off; str() is a one-line message naming the URL.

    `summary` holds what was done before the error (None if nothing was listed yet);
    `unreachable` is True when the server could not be reached (or did not answer) before
    anything was listed: the local copy is as the last sync left it."""

    def __init__(self, message: str, summary: "SyncSummary | None" = None,
                 unreachable: bool = False):
        super().__init__(message)
        self.summary = summary
        self.unreachable = unreachable


class UnsafeKeyError(ValueError):
    """An object key that cannot be mapped to a path inside the destination folder."""


@dataclasses.dataclass(frozen=True)
class SyncSummary:
    downloaded: int
    skipped: int
    failed: int
    bytes: int  # bytes downloaded by this run (skipped files not included)
    seconds: float
    refused: list[str]  # keys refused for path safety (nothing written for them)
    failures: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> cause
    not_in_bucket: int = 0  # local files (not hidden) no longer in the bucket
    deleted_removed: bool = False  # ... and deleted by this sync (delete_removed)

    @property
    def ok(self) -> bool:
        """True when every listed object is now present locally."""
        return not self.failed and not self.refused

    def describe(self, delete_option: str = "--s3_delete_removed") -> str:
        """One line; `delete_option` names the caller's option of `delete_removed`."""
        mb = self.bytes / 1e6
        seconds = max(self.seconds, 1e-9)
        line = (f"downloaded {self.downloaded}, skipped {self.skipped}, failed {self.failed}, "
                f"{mb:.1f} MB in {self.seconds:.1f} s "
                f"({self.downloaded / seconds:.0f} files/s, {mb / seconds:.1f} MB/s)")
        if self.refused:
            line += f", refused {len(self.refused)} unsafe keys"
        if self.not_in_bucket:
            files = f"{self.not_in_bucket} local file{'s' if self.not_in_bucket != 1 else ''}"
            line += (f"; {files} no longer in the bucket: deleted ({delete_option})"
                     if self.deleted_removed else
                     f"; {files} no longer in the bucket: kept ({delete_option} deletes them)")
        return line


@dataclasses.dataclass(frozen=True)
class _Object:
    key: str
    size: int
    etag: str  # without quotes
    path: str  # local destination

    @property
    def md5(self) -> str | None:
        return self.etag.lower() if PLAIN_MD5_ETAG.match(self.etag) else None


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (BUCKET, PREFIX) with PREFIX '' or ending in '/'.

    The prefix is a folder: ``s3://b/birds`` and ``s3://b/birds/`` both mean keys under
    ``birds/``. Raises ValueError for anything else."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3:// URL (expected s3://BUCKET/PREFIX)")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", bucket):
        raise ValueError(f"{url!r} has no valid bucket name (expected s3://BUCKET/PREFIX)")
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""


def local_path_for_key(prefix: str, key: str, dest: str) -> str:
    """The local path of object `key` under `dest`, or UnsafeKeyError.

    Refused: keys outside `prefix`, empty, '.' or '..' segments (so also '//' and absolute
    paths), backslashes (a path separator on Windows and in many tools), NUL, names that look
    like this module's temporary files, and anything that would still resolve outside `dest`."""
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if not key.startswith(prefix):
        raise UnsafeKeyError(f"key {key!r} is not under prefix {prefix!r}")
    relative = key[len(prefix):]
    if not relative:
        raise UnsafeKeyError(f"key {key!r} names the prefix itself")
    if "\\" in relative or "\0" in relative:
        raise UnsafeKeyError(f"key {key!r} contains a backslash or NUL")
    segments = relative.split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise UnsafeKeyError(f"key {key!r} has an empty, '.' or '..' path segment")
        if os.name == "nt" and ":" in segment:
            raise UnsafeKeyError(f"key {key!r} contains a drive or stream separator")
    if TEMP_PATTERN.match(segments[-1]):
        raise UnsafeKeyError(f"key {key!r} looks like a temporary download file")
    root = os.path.abspath(dest)
    path = os.path.normpath(os.path.join(root, *segments))
    if path == root or os.path.commonpath([root, path]) != root:
        raise UnsafeKeyError(f"key {key!r} would be written outside {dest!r}")
    return path


def temp_path_for(path: str) -> str:
    folder, name = os.path.split(path)
    suffix = f".part-{secrets.token_hex(4)}"
    temp_name = f".{name}{suffix}"
    if len(os.fsencode(temp_name)) > 255:
        temp_name = f".{hashlib.sha1(os.fsencode(name)).hexdigest()}{suffix}"
    return os.path.join(folder, temp_name)


def remove_stale_temp_files(dest: str) -> int:
    """Deletes temporary download files left under `dest` by an interrupted run."""
    removed = 0
    for folder, _, files in os.walk(dest):
        for name in files:
            if TEMP_PATTERN.match(name):
                try:
                    os.unlink(os.path.join(folder, name))
                    removed += 1
                except OSError:
                    pass  # gone already, or not ours to delete: never counted as data anyway
    return removed


# Written into the destination by a sync that left every listed object present locally, removed
# before a sync changes any file: a restart that cannot reach the server may train on a copy
# that has it (trainer/loop/inputs.py). Hidden, so the dataset scanner never lists it.
SYNC_RECORD = ".s3_sync_complete.json"


def read_sync_record(dest: str, source: str | None = None) -> dict | None:
    """The completion record of the last sync into `dest` (of `source`, when given), or None
    when there is none: the copy is incomplete, or being changed, or was never synced."""
    try:
        with open(os.path.join(dest, SYNC_RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or (source is not None and record.get("source") != source):
        return None
    return record


def _remove_sync_record(dest: str) -> None:
    try:
        os.unlink(os.path.join(dest, SYNC_RECORD))
        fsync_path(dest)
    except FileNotFoundError:
        pass


def _write_sync_record(dest: str, source: str, objects: list) -> None:
    finished = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    atomic_write_text(os.path.join(dest, SYNC_RECORD), json.dumps(
        {"source": source, "finished": finished, "files": len(objects),
         "bytes": sum(obj.size for obj in objects)}))


def local_files_not_in(dest: str, objects: list) -> list[str]:
    """Files under `dest` that no listed object maps to, hidden ones (temporary downloads, the
    sync record, the data check's cache) and those in hidden folders left out; sorted."""
    listed = {os.path.normpath(obj.path) for obj in objects}
    found = []
    for folder, dirs, names in os.walk(dest):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(folder, name) for name in names
                  if not name.startswith(".") and
                  os.path.normpath(os.path.join(folder, name)) not in listed]
    return sorted(found)


def _delete_local(dest: str, paths: list[str]) -> None:
    """Deletes `paths`, then the folders under `dest` they leave empty (a removed class)."""
    folders = set()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        folders.add(os.path.dirname(path))
    root = os.path.abspath(dest)
    for folder in sorted(folders, key=len, reverse=True):
        while os.path.abspath(folder) != root and folder.startswith(root):
            try:
                os.rmdir(folder)  # only when empty
            except OSError:
                break
            folder = os.path.dirname(folder)


def file_md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def is_up_to_date(obj: _Object) -> bool:
    """The local file has the object's size and, for a plain-MD5 ETag, its MD5."""
    try:
        stat = os.stat(obj.path)
    except OSError:
        return False
    if not os.path.isfile(obj.path) or stat.st_size != obj.size:
        return False
    expected = obj.md5
    if expected is None:
        return True
    try:
        return file_md5(obj.path) == expected
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the URL and the cause, never a credential.

def _botocore_exceptions():
    import botocore.exceptions
    return botocore.exceptions


def _error_code(error: BaseException) -> str | None:
    for candidate in (error, error.__cause__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code")
    return None


def _is_unreachable(error: BaseException) -> bool:
    exc = _botocore_exceptions()
    return isinstance(error, (exc.EndpointConnectionError, exc.ConnectTimeoutError,
                              ConnectionRefusedError))


def _is_transfer_error(error: BaseException) -> bool:
    """A network-level failure (as opposed to an answer from the server)."""
    import aiohttp
    exc = _botocore_exceptions()
    if _error_code(error) is not None:
        return False
    return isinstance(error, (exc.HTTPClientError, exc.ConnectionError, exc.IncompleteReadError,
                              aiohttp.ClientError, asyncio.TimeoutError, TimeoutError,
                              ConnectionError, _IncompleteTransfer))


class _IncompleteTransfer(Exception):
    pass


class _ContentMismatch(Exception):
    pass


def describe_error(error: BaseException, *, endpoint: str, bucket: str, anon: bool,
                   connect_timeout: float, read_timeout: float,
                   secrets_to_hide: tuple[str, ...] = ()) -> str:
    """The cause part of a user message (no URL, no traceback, no credential)."""
    exc = _botocore_exceptions()
    code = _error_code(error)
    if isinstance(error, exc.NoCredentialsError):
        text = ("no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE or ~/.aws/credentials; for a public bucket use anonymous access)")
    elif isinstance(error, exc.ConnectTimeoutError):
        text = f"timed out connecting to {endpoint} after {connect_timeout:g} s"
    elif isinstance(error, (exc.EndpointConnectionError, ConnectionRefusedError)):
        text = f"cannot connect to {endpoint} (is the server up and the endpoint right?)"
    elif isinstance(error, exc.ReadTimeoutError):
        text = f"{endpoint} did not answer within {read_timeout:g} s"
    elif isinstance(error, OSError) and error.filename is not None:
        text = f"{error.strerror or error} ({error.filename})"  # a local file error
    elif code == "NoSuchBucket":
        text = f"bucket {bucket!r} does not exist at {endpoint}"
    elif code == "SignatureDoesNotMatch":
        text = ("access denied: the secret key does not match the access key "
                "(SignatureDoesNotMatch)")
    elif code == "InvalidAccessKeyId":
        text = "access denied: the access key is unknown to the server (InvalidAccessKeyId)"
    elif code == "AccessDenied" or isinstance(error, PermissionError):
        if anon:
            text = (f"access denied to anonymous requests ({code or 'AccessDenied'}): the bucket "
                    "is not public, or does not exist; use credentials instead of anonymous "
                    "access")
        else:
            text = (f"access denied ({code or 'AccessDenied'}): these credentials may not "
                    "list or read it")
    elif code == "NoSuchKey":
        text = "the object no longer exists (deleted after listing?)"
    elif code is not None and code.isdigit():
        # An HTTP status without an S3 error document: likely not an S3 server at all.
        text = (f"{endpoint} answered HTTP {code} without an S3 error code: is it an S3 "
                "endpoint, and are the endpoint and bucket right?")
    elif isinstance(error, _IncompleteTransfer | _ContentMismatch):
        text = str(error)
    elif _is_transfer_error(error):
        text = f"the transfer from {endpoint} was cut off ({type(error).__name__})"
    else:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        text = f"{code or type(error).__name__}: {message}" if message else (code or
                                                                          type(error).__name__)
    for hidden in secrets_to_hide:
        if len(hidden) >= 8:  # shorter strings are not real credentials, and too common
            text = text.replace(hidden, "***")
    return text


# ---------------------------------------------------------------------------------------------

class _Progress:
    """tqdm over bytes, with files done/total in the postfix, or with `log` a line every few
    seconds (files, rate, ETA: for log files, as the trainer's); thread-safe enough for one
    loop."""

    def __init__(self, enabled: bool, total_files: int, total_bytes: int, log=None):
        self.total_files = total_files
        self.files = 0
        self.bar = None
        self.lines = Progress("s3 sync", total_files, log, unit="files") if log else None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                            desc="s3", file=sys.stderr, dynamic_ncols=True,
                            mininterval=0.2, postfix=f"0/{total_files} files")

    def add_bytes(self, count: int) -> None:
        if self.bar is not None and count:
            self.bar.update(count)

    def file_done(self) -> None:
        self.files += 1
        if self.lines is not None:
            self.lines.update()
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.files}/{self.total_files} files", refresh=False)

    def close(self) -> None:
        if self.lines is not None:
            self.lines.close()
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.files}/{self.total_files} files", refresh=False)
            self.bar.close()


class _State:
    """Counters of one sync; only touched from the event loop's thread."""

    def __init__(self):
        self.downloaded = 0
        self.bytes = 0
        self.failures: dict[str, str] = {}
        self.consecutive_transfer_failures = 0
        self.abort: BaseException | None = None


def _make_filesystem(anon, endpoint_url, key, secret, workers, connect_timeout, read_timeout,
                     max_attempts):
    import s3fs
    if anon:
        credentials = {"anon": True}
    elif key is not None or secret is not None:
        credentials = {"key": key, "secret": secret}
    else:
        credentials = {}  # the standard AWS chain: environment, ~/.aws, instance roles
    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint_url, skip_instance_cache=True, use_listings_cache=False,
        config_kwargs={"connect_timeout": connect_timeout, "read_timeout": read_timeout,
                       "retries": {"total_max_attempts": max(1, max_attempts),
                                   "mode": "standard"},
                       "max_pool_connections": max(10, workers)},
        **credentials)
    fs.retries = 1  # botocore retries (above) already; s3fs would multiply them
    return fs


async def _list_objects(fs, bucket: str, prefix: str) -> list[dict]:
    contents = []
    kwargs = {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = await fs._call_s3("list_objects_v2", **kwargs)
        contents.extend(page.get("Contents", []))
        if not page.get("IsTruncated"):
            return contents
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


async def _download_one(fs, bucket: str, obj: _Object, progress: _Progress,
                        made_dirs: set[str]) -> int:
    """Downloads to a temporary file in the final folder and renames it into place."""
    folder = os.path.dirname(obj.path)
    if folder not in made_dirs:
        os.makedirs(folder, exist_ok=True)
        made_dirs.add(folder)
    temp = temp_path_for(obj.path)
    received = 0
    try:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=obj.key)
        body = response["Body"]
        verify_md5 = obj.md5 is not None and not (
            response.get("ServerSideEncryption", "").startswith("aws:kms")
            or response.get("SSECustomerAlgorithm"))
        digest = hashlib.md5() if verify_md5 else None
        try:
            with open(temp, "wb") as f:
                while chunk := await body.read(CHUNK_SIZE):
                    f.write(chunk)
                    if digest is not None:
                        digest.update(chunk)
                    received += len(chunk)
                    progress.add_bytes(len(chunk))
        finally:
            body.close()
        if received != obj.size:
            raise _IncompleteTransfer(f"got {received} of {obj.size} bytes")
        if digest is not None and digest.hexdigest() != obj.md5:
            raise _ContentMismatch("content does not match its MD5 (the ETag); "
                                   "changed during the download?")
        os.replace(temp, obj.path)
        return received
    except BaseException:
        progress.add_bytes(-received)
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


async def _download_all(fs, bucket: str, objects: list[_Object], workers: int,
                        max_attempts: int, progress: _Progress, state: _State,
                        describe) -> None:
    pending = iter(objects)
    made_dirs: set[str] = set()

    async def worker():
        for obj in pending:
            if state.abort is not None:
                return
            for attempt in range(1, max(1, max_attempts) + 1):
                try:
                    size = await _download_one(fs, bucket, obj, progress, made_dirs)
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # noqa: BLE001 - classified below
                    if isinstance(error, OSError) and error.errno in FATAL_LOCAL_ERRNOS:
                        state.abort = error
                        return
                    if _is_unreachable(error):
                        state.abort = error
                        return
                    transfer = _is_transfer_error(error) or isinstance(error, _ContentMismatch)
                    if transfer and attempt < max_attempts and state.abort is None:
                        await asyncio.sleep(0.2 * attempt)
                        continue
                    state.failures[obj.key] = describe(error)
                    if transfer:
                        state.consecutive_transfer_failures += 1
                        if state.consecutive_transfer_failures >= MAX_CONSECUTIVE_TRANSFER_FAILURES:
                            state.abort = error
                            return
                    break
                else:
                    state.downloaded += 1
                    state.bytes += size
                    state.consecutive_transfer_failures = 0
                    progress.file_done()
                    break

    await asyncio.gather(*(worker() for _ in range(max(1, workers))))


def _objects_of_listing(listing: list[dict], prefix: str, dest: str
                        ) -> tuple[list[_Object], list[str]]:
    """The objects to sync with their local paths, and the keys refused as unsafe."""
    objects: list[_Object] = []
    refused: list[str] = []
    for entry in listing:
        object_key = entry["Key"]
        if object_key.endswith("/"):
            continue  # a "folder" marker, not a file
        try:
            path = local_path_for_key(prefix, object_key, dest)
        except UnsafeKeyError:
            refused.append(object_key)
            continue
        objects.append(_Object(object_key, int(entry.get("Size", 0)),
                               str(entry.get("ETag", "")).strip('"'), path))
    return objects, refused


def _download(fs, bucket: str, to_fetch: list[_Object], workers: int, max_attempts: int,
              progress: bool, describe, log=None) -> _State:
    """Fetches `to_fetch` with a progress bar (or lines to `log`); what went wrong is in the
    returned state."""
    import fsspec.asyn
    state = _State()
    bar = _Progress(progress and bool(to_fetch), len(to_fetch), sum(o.size for o in to_fetch),
                    log)
    try:
        if to_fetch:
            fsspec.asyn.sync(fs.loop, _download_all, fs, bucket, to_fetch, workers,
                             max_attempts, bar, state, describe)
    except Exception as error:  # noqa: BLE001 - e.g. an unexpected bug: still one line
        state.abort = error
    finally:
        bar.close()
    return state


def _make_destination(url: str, dest: str) -> str:
    """`dest` made absolute and created; a one-line S3SyncError if it cannot be."""
    try:
        dest = os.path.abspath(dest)
        os.makedirs(dest, exist_ok=True)
    except OSError as error:
        raise S3SyncError(f"{url}: cannot create the destination {dest!r}: "
                          f"{error.strerror or error}") from None
    return dest


def _prepare_destination(dest: str, objects: list, workers: int,
                         delete_removed: bool) -> tuple[list, list]:
    """The objects to fetch (not up to date locally) and the local files no object maps to
    (deleted here with `delete_removed`). A copy about to change loses its SYNC_RECORD first:
    it is not complete again until the sync ends whole."""
    remove_stale_temp_files(dest)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, 32))) as pool:
        up_to_date = list(pool.map(is_up_to_date, objects))
    to_fetch = [obj for obj, done in zip(objects, up_to_date) if not done]
    not_in_bucket = local_files_not_in(dest, objects)
    if to_fetch or (delete_removed and not_in_bucket):
        _remove_sync_record(dest)
    if delete_removed:
        _delete_local(dest, not_in_bucket)
    return to_fetch, not_in_bucket


def _stopped(url: str, dest: str, error: BaseException, result: SyncSummary, total: int,
             describe) -> S3SyncError:
    """The one-line error of a sync that stopped part way (what it did is kept)."""
    if isinstance(error, OSError) and error.errno in FATAL_LOCAL_ERRNOS:
        return S3SyncError(f"{url}: cannot write under {dest}: {error.strerror or error}; "
                           f"{result.downloaded} files were downloaded before, run again to "
                           f"resume", result)
    return S3SyncError(f"{url}: stopped after {result.downloaded + result.skipped} of {total} "
                       f"files (kept; run again to resume): {describe(error)}", result)


def sync(source: str, dest: str, *, anon: bool = False, endpoint_url: str | None = None,
         key: str | None = None, secret: str | None = None, workers: int = 16,
         progress: bool = True, connect_timeout: float = 5, read_timeout: float = 20,
         max_attempts: int = 2, log=None, delete_removed: bool = False) -> SyncSummary:
    """Copies every object under ``s3://BUCKET/PREFIX`` to ``dest/<key relative to prefix>``.

    Credentials: `anon` for public buckets; else `key`/`secret` if given; else the standard
    AWS chain (environment variables, ~/.aws, instance roles). `endpoint_url` selects an
    S3-compatible server. `workers` transfers run at once. With `progress`, a tqdm bar and a
    final summary line go to stderr; with `log`, a progress line every few seconds goes there.
    Local files (not hidden) that no object maps to are counted in the summary, and deleted
    with `delete_removed`. When every object is then present locally, SYNC_RECORD is written
    (`read_sync_record`). Raises S3SyncError (see module doc)."""
    start = time.monotonic()
    try:
        bucket, prefix = parse_s3_url(source)
    except ValueError as error:
        raise S3SyncError(str(error)) from None
    url = f"s3://{bucket}/{prefix}"
    hidden = tuple(s for s in (key, secret) if s)
    endpoint = endpoint_url or "AWS S3"

    def describe(error: BaseException) -> str:
        return describe_error(error, endpoint=endpoint, bucket=bucket, anon=anon,
                              connect_timeout=connect_timeout, read_timeout=read_timeout,
                              secrets_to_hide=hidden)

    dest = _make_destination(url, dest)

    import fsspec.asyn
    try:
        fs = _make_filesystem(anon, endpoint_url, key, secret, workers, connect_timeout,
                              read_timeout, max_attempts)
        fsspec.asyn.sync(fs.loop, fs.set_session)
        endpoint = endpoint_url or getattr(fs.s3.meta, "endpoint_url", None) or "AWS S3"
        listing = fsspec.asyn.sync(fs.loop, _list_objects, fs, bucket, prefix)
    except Exception as error:  # noqa: BLE001 - every cause becomes one line
        unreachable = _is_unreachable(error) or _is_transfer_error(error) or \
            isinstance(error, _botocore_exceptions().ReadTimeoutError)
        raise S3SyncError(f"{url}: {describe(error)}", unreachable=unreachable) from None

    objects, refused = _objects_of_listing(listing, prefix, dest)
    if not objects and not refused:
        raise S3SyncError(f"{url}: no objects under this prefix at {endpoint}")

    to_fetch, not_in_bucket = _prepare_destination(dest, objects, workers, delete_removed)
    state = _download(fs, bucket, to_fetch, workers, max_attempts, progress, describe, log)
    result = SyncSummary(downloaded=state.downloaded, skipped=len(objects) - len(to_fetch),
                         failed=len(state.failures), bytes=state.bytes,
                         seconds=time.monotonic() - start, refused=refused,
                         failures=dict(state.failures), not_in_bucket=len(not_in_bucket),
                         deleted_removed=delete_removed)
    if state.abort is not None:
        raise _stopped(url, dest, state.abort, result, len(objects), describe) from None
    if result.ok:
        _write_sync_record(dest, url, objects)
    if progress:
        print(f"{url}: {result.describe()}", file=sys.stderr)
    return result
