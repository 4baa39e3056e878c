"""A real trainer process that also counts what its evaluations read, for the finishing tests.

    python -m tests.finish_probe CONFIG_JSON OUT_JSON

builds `Config(**fields of CONFIG_JSON)`, runs trainer.loop.train.run in this process and writes
OUT_JSON: {"results": what run returned, "drawn": {split: evaluation batches drawn in the whole
run}, "drawn_before_finish": {split: those drawn before the finishing phase began},
"traces": {StepFunctions tf.function name: times traced}}.

A batch is counted when it leaves data.datasets.eval_dataset (every evaluation dataset of image
folders: the trainer's splits and any other pass over the files), keyed by the split folder its
files are in; nothing else in the run is changed.
"""
from __future__ import annotations

import collections
import json
import os
import sys


def _count_eval_batches(drawn: collections.Counter) -> None:
    import tensorflow as tf

    from data import datasets
    original = datasets.eval_dataset

    def counted(files, labels, **kwargs):
        files = list(files)
        split = os.path.basename(os.path.dirname(os.path.dirname(files[0]))) if files else "-"

        def bump():
            drawn[split] += 1
            return 0

        def tick(*batch):
            done = tf.py_function(bump, [], tf.int32)
            with tf.control_dependencies([done]):
                return tuple(tf.identity(t) for t in batch)
        return original(files, labels, **kwargs).map(tick)
    datasets.eval_dataset = counted


def main(argv: list[str]) -> int:
    config_path, out_path = argv
    from trainer.config import Config
    from trainer.loop import finish, step, train
    drawn, before = collections.Counter(), {}
    _count_eval_batches(drawn)
    instances = []
    real_init, real_finish = step.StepFunctions.__init__, finish.finish

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        instances.append(self)

    def finishing(controller, run_start):
        before.update(drawn)
        return real_finish(controller, run_start)
    step.StepFunctions.__init__, finish.finish = init, finishing
    with open(config_path) as f:
        results = train.run(Config(**json.load(f)))
    traces = {name: fn.experimental_get_tracing_count() for steps in instances
              for name, fn in vars(steps).items()
              if hasattr(fn, "experimental_get_tracing_count")}
    with open(out_path, "w") as f:
        json.dump({"results": results, "drawn": dict(drawn), "drawn_before_finish": before,
                   "traces": traces}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
