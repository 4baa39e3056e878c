"""Download a dataset from S3 to a local folder, incrementally and resumably.

    python -m data.download --source=s3://BUCKET/PREFIX --dest=DIR [--s3_anon]
        [--s3_endpoint_url=URL] [--workers=N] [--no_progress] [--s3_delete_removed]

Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, ~/.aws/...); --s3_anon reads a public bucket without any. Run it again to resume or
update: complete files are skipped. Local files no longer in the bucket are counted in the
summary line and kept, or deleted with --s3_delete_removed. Exit status: 0 when every object is present locally, 1 when
the sync failed or some objects failed or were refused (one line on stderr says which), 2 for
usage errors, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import sys

from data import s3

MAX_KEYS_SHOWN = 3


def _s3_url(value: str) -> str:
    try:
        s3.parse_s3_url(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.download",
        description="Copy every object under s3://BUCKET/PREFIX to DEST/<key relative to "
                    "PREFIX>; files already present and identical are skipped.")
    parser.add_argument("--source", required=True, type=_s3_url, metavar="s3://BUCKET/PREFIX",
                        help="bucket and folder to copy")
    parser.add_argument("--dest", required=True, metavar="DIR", help="local folder")
    parser.add_argument("--s3_anon", action="store_true",
                        help="anonymous access, for public buckets (no credentials sent)")
    parser.add_argument("--s3_endpoint_url", default=None, metavar="URL",
                        help="S3-compatible server, e.g. http://127.0.0.1:8333 (default: AWS, "
                             "or AWS_ENDPOINT_URL)")
    parser.add_argument("--workers", type=_positive_int, default=16,
                        help="parallel transfers (default: %(default)s)")
    parser.add_argument("--s3_delete_removed", action="store_true",
                        help="delete local files (not hidden ones) that are no longer in the "
                             "bucket (default: keep them; the summary says how many)")
    parser.add_argument("--no_progress", action="store_true",
                        help="no progress bar (the summary line is still printed)")
    return parser


def _keys_line(keys: list[str], causes: dict[str, str] | None = None) -> str:
    shown = []
    for key in keys[:MAX_KEYS_SHOWN]:
        shown.append(f"{key!r} ({causes[key]})" if causes and key in causes else repr(key))
    more = f" and {len(keys) - MAX_KEYS_SHOWN} more" if len(keys) > MAX_KEYS_SHOWN else ""
    return ", ".join(shown) + more


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bucket, prefix = s3.parse_s3_url(args.source)
    url = f"s3://{bucket}/{prefix}"  # as the library's messages spell it
    try:
        summary = s3.sync(args.source, args.dest, anon=args.s3_anon,
                          endpoint_url=args.s3_endpoint_url, workers=args.workers,
                          progress=not args.no_progress,
                          delete_removed=args.s3_delete_removed)
    except s3.S3SyncError as error:
        print(f"download: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"download: {url}: interrupted; files already downloaded are kept, run "
              "again to resume", file=sys.stderr)
        return 130
    if args.no_progress:
        print(f"{url}: {summary.describe()}", file=sys.stderr)
    status = 0
    if summary.failed:
        keys = sorted(summary.failures)
        print(f"download: {url}: {summary.failed} of "
              f"{summary.failed + summary.downloaded + summary.skipped} files failed: "
              f"{_keys_line(keys, summary.failures)}; run again to retry", file=sys.stderr)
        status = 1
    if summary.refused:
        print(f"download: {url}: refused {len(summary.refused)} keys that would land "
              f"outside {args.dest}: {_keys_line(summary.refused)}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
