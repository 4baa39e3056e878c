"""The input benchmark rows run end to end at a tiny size (no timing is asserted: they must not
rot)."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_input_rows_run_and_print_their_table():
    result = subprocess.run(
        [sys.executable, "-m", "bench.input_rows", "--image_size=32", "--batch_size=8",
         "--steps=2", "--warmup_steps=1", "--images_per_class=4",
         "--rows=in_folder,in_packed,in_disk,in_service2,s3_sync"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for label in ("folder (JPEG files), no cache", "packed shards, no cache",
                  "packed, --cache_images=disk", "packed, tf.data service, 2 workers",
                  "S3 sync of the photo set as files", "S3 sync of the photo set as packed"):
        assert label in result.stdout, result.stdout
