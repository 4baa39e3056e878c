"""Peak memory of the training input with a given cache (tests/test_cache_choice.py runs this
in a fresh process): `python -m tests.cache_memory_probe DATA_DIR IMAGE_SIZE CACHE` prints
`baseline_kb peak_kb` (VmHWM after TensorFlow and the strategy are up, and after 40
distributed batches from two logical CPU replicas)."""
import sys

import tensorflow as tf


def high_water_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def main(data_dir: str, image_size: int, cache: str) -> None:
    from data import layout
    from data.datasets import train_dataset
    from data.spec import InputSpec
    from trainer.loop import distribute
    distribute.split_cpu(2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    train = layout.scan_split(data_dir, "train", layout.train_class_names(data_dir))
    with strategy.scope():
        tf.zeros([8]) + 1
    baseline = high_water_kb()

    def dataset_fn(context):
        return train_dataset(train.files, train.labels, InputSpec(image_size, 32, cache=cache),
                             context, total_steps=40)
    for _ in strategy.distribute_datasets_from_function(dataset_fn):
        pass
    print(baseline, high_water_kb())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
