"""Training with --data_dir=s3://... end to end, against the real SeaweedFS test server."""
from __future__ import annotations

import json
import shutil

from tests.conftest import FAST_DEMO_FLAGS, run_trainer


def test_training_from_an_s3_bucket(s3_server, demo_dir, tmp_path):
    # Only the splits: other tests leave the data check's cache file in demo_dir, and a synced
    # copy of it would be rewritten by the check on the local side.
    source = tmp_path / "source"
    for split in ("train", "valid", "test"):
        shutil.copytree(demo_dir / split, source / split)
    s3_server.make_bucket("trainer-e2e-public", public=True)
    s3_server.upload_tree(str(source), "trainer-e2e-public", "100-bird-species")
    cache, model_dir = tmp_path / "cache", tmp_path / "run"
    flags = ("--data_dir=s3://trainer-e2e-public/100-bird-species", f"--data_cache_dir={cache}",
             "--s3_anon", f"--s3_endpoint_url={s3_server.endpoint_url}",
             f"--model_dir={model_dir}", *FAST_DEMO_FLAGS, "--train_steps=6",
             "--distribution_strategy=one_device", "--noexport_at_end")
    first = run_trainer(*flags)
    local = cache / "trainer-e2e-public" / "100-bird-species"
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == [
        "test", "train", "valid"]
    uploaded = sum(1 for p in source.rglob("*") if p.is_file())
    assert f"downloaded {uploaded}, skipped 0, failed 0" in first.stdout
    results = json.loads((model_dir / "results.json").read_text())
    assert results["splits"]["test"]["images"] == 270
    # The run records the S3 source, not the cache path; and credentials appear nowhere.
    config = json.loads((model_dir / "config.json").read_text())
    assert config["data_dir"] == "s3://trainer-e2e-public/100-bird-species"
    for path in model_dir.rglob("*"):
        if path.is_file():
            assert s3_server.secret.encode() not in path.read_bytes(), path

    # A second start syncs nothing new and says the run is finished.
    again = run_trainer(*flags)
    assert f"downloaded 0, skipped {uploaded}, failed 0" in again.stdout
    assert "is finished" in again.stdout
