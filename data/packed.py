"""Reading packed data (TFRecord shards written by data/pack.py) for training and evaluation.

Input pipeline `id` of `n` owns the items at positions `id, id+n, ...` of a split, as with image
folders, so both give each pipeline the same images with the same labels. Per `cache` mode:

* memory: the pipeline's records are decoded once into one uint8 tensor in item order, then
  visited in the same stateless permutation as a folder's: the very batches (and losses) of
  training on the folder the data was packed from;
* none: shards are read in the grouped order (data.orders.grouped_epochs: shards permuted per
  epoch, `GROUP_SHARDS` read together, their records permuted); memory is a few shards; a resume
  skips unread every group before the restored position;
* disk: decoded once into chunk files (data/diskcache.py), then read in the grouped order.

Evaluation reads the shards of a split in order (they keep the check's order) and pads each
pipeline with weight-0 blank images to whole global batches: every image exactly once.
"""
from __future__ import annotations

import hashlib
import os

import tensorflow as tf

from data import diskcache
from data.datasets import AUTOTUNE, batch_and_mix, cache_mode, decoded_in_memory
from data.decode import check_crop_fraction, decode_and_resize, decode_for_eval
from data.manifest import Manifest
from data.orders import EpochPlan, grouped_epochs, pipeline_shard, random_access_epochs
from data.spec import InputSpec

GROUP_SHARDS = 4
_FEATURES = {"image": tf.io.FixedLenFeature([], tf.string),
             "label": tf.io.FixedLenFeature([], tf.int64),
             "index": tf.io.FixedLenFeature([], tf.int64)}


def _records(paths, num_pipelines: int, pipeline_id: int, parallel: int = 4) -> tf.data.Dataset:
    """(image bytes, label, local index) of this pipeline's records in `paths`, in file order."""
    ds = tf.data.TFRecordDataset(paths, num_parallel_reads=parallel)
    ds = ds.map(lambda record: tf.io.parse_single_example(record, _FEATURES),
                num_parallel_calls=AUTOTUNE)
    ds = ds.filter(lambda r: r["index"] % num_pipelines == pipeline_id)
    return ds.map(lambda r: (r["image"], tf.cast(r["label"], tf.int32),
                             (r["index"] - pipeline_id) // num_pipelines))


class PackedSource:
    """TFRecord shards of data/pack.py (data/source.py has the interface)."""
    kind = "packed"
    balanced_cache_modes = ("memory",)  # the other modes read the shards in blocks

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.data_dir = manifest.data_dir

    def _blocks(self, split: str, plan) -> tuple[list[str], list[int]]:
        """This pipeline's shards (those holding any of its items) and its items in each."""
        paths, sizes = [], []
        for shard in self.manifest.shards[split]:
            mine = sum(1 for i in shard.indices if i % plan.num_pipelines == plan.pipeline_id)
            if mine:
                paths.append(self.manifest.shard_path(shard))
                sizes.append(mine)
        return paths, sizes

    def train_dataset(self, split, spec: InputSpec, context=None, *, start_step: int = 0,
                      total_steps: int, log=None) -> tf.data.Dataset:
        """As data.datasets.train_dataset; the order per cache mode is in the module doc."""
        image_size, seed, augment = spec.image_size, spec.seed, spec.augment
        plan = EpochPlan.make(len(split), spec.global_batch_size, start_step, total_steps,
                              context)
        n, pid = plan.num_pipelines, plan.pipeline_id
        labels = tf.constant(split.labels[pid::n], tf.int32)
        paths, sizes = self._blocks(split.name, plan)
        mode = cache_mode(spec.cache)
        if mode == "memory":  # every record, as a folder's memory cache holds every file
            all_paths = [self.manifest.shard_path(s) for s in self.manifest.shards[split.name]]

            def make_stream():
                return _records(all_paths, 1, 0).map(
                    lambda image, label, local: (decode_and_resize(image, image_size), local),
                    num_parallel_calls=AUTOTUNE).batch(64)
            images = decoded_in_memory(
                ("packed", tuple(s.sha256 for s in self.manifest.shards[split.name])),
                len(split), image_size, make_stream, log)
            ds = random_access_epochs(plan, seed, tf.data.Dataset.from_tensors(images),
                                      lambda items, i: items[i],
                                      tf.constant(split.labels, tf.int32), image_size, augment,
                                      spec.balanced)
        elif spec.balanced:
            raise ValueError("balanced sampling of packed data needs --cache_images=memory (the "
                             "shards are read in blocks otherwise)")
        elif mode == "disk":
            chunks = self._disk_cache(split, paths, plan, image_size, spec.cache_dir, log)
            ds = grouped_epochs(plan, seed, chunks.sizes, chunks.load_group, labels, image_size,
                                augment, diskcache.GROUP_CHUNKS, encoded=False)
        else:
            all_paths = tf.constant(paths)
            most = sum(sorted(sizes)[-GROUP_SHARDS:])  # records in the largest group

            def load_group(ids):
                images, _, local = _records(tf.gather(all_paths, ids), n, pid).batch(
                    most).get_single_element()
                order = tf.argsort(local)  # whatever order the parallel reads gave
                return tf.gather(images, order), tf.gather(local, order)
            ds = grouped_epochs(plan, seed, sizes, load_group, labels, image_size, augment,
                                GROUP_SHARDS, encoded=True)
        return batch_and_mix(ds, plan, seed=seed, mix=spec.mix, with_ids=spec.with_ids)

    def disk_cache_name(self, split, image_size: int, num_pipelines: int,
                        pipeline_id: int) -> str:
        """The disk cache folder name (under CACHE_DIR/decoded) of one pipeline's share."""
        digest = hashlib.sha256(f"packed {os.path.abspath(self.data_dir)} {split.name} "
                                f"{num_pipelines} {pipeline_id} {image_size}".encode())
        return digest.hexdigest()[:24]

    def _disk_cache(self, split, paths, plan, image_size, cache_dir, log):
        name = self.disk_cache_name(split, image_size, plan.num_pipelines, plan.pipeline_id)
        key = name + " " + " ".join(s.sha256 for s in self.manifest.shards[split.name]) + \
            f" {diskcache.VERSION} {tf.__version__}"

        def make_stream():
            return _records(paths, plan.num_pipelines, plan.pipeline_id, parallel=1).map(
                lambda image, label, local: (decode_and_resize(image, image_size), local),
                num_parallel_calls=AUTOTUNE).batch(diskcache.CHUNK_IMAGES)
        return diskcache.open_or_build(cache_dir, name, key, make_stream, image_size, log,
                                       plan.shard_size)

    def eval_dataset(self, split, spec: InputSpec, context=None) -> tf.data.Dataset:
        """Every image of `split` once, in item order, then weight-0 blanks to whole batches;
        the pixels of data.decode.decode_for_eval with `spec.eval_crop` (the records keep the
        aspect ratio, so the centre crop is that of the source folder)."""
        eval_crop, image_size = check_crop_fraction(spec.eval_crop), spec.image_size
        global_batch_size = spec.eval_batch_size
        n, pid, replicas = pipeline_shard(context)
        padded = -(-len(split) // global_batch_size) * global_batch_size
        paths = [self.manifest.shard_path(s) for s in self.manifest.shards[split.name]]
        ds = _records(paths, n, pid, parallel=1).map(
            lambda image, label, local: (decode_for_eval(image, image_size, eval_crop), label,
                                         tf.ones([], tf.float32)), num_parallel_calls=AUTOTUNE)
        blank = (tf.zeros([image_size, image_size, 3], tf.uint8), tf.zeros([], tf.int32),
                 tf.zeros([], tf.float32))
        pad = len(range(len(split), padded)[(pid - len(split)) % n::n])
        ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(pad))
        if cache_mode(spec.eval_cache) == "memory":
            ds = ds.cache()
        per_replica_batch = global_batch_size // (n * replicas)
        return ds.batch(per_replica_batch, drop_remainder=True).prefetch(AUTOTUNE)
