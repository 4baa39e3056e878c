"""Train an image classifier: python -m trainer.main --flagfile=configs/NAME.cfg [FLAGS...]"""
from __future__ import annotations

import os
import sys

from absl import app, logging

from trainer import flags as trainer_flags


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"trainer: unexpected arguments {argv[1:]} (flags look like --name=value)",
              file=sys.stderr)
        return 2
    if not trainer_flags.flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # absl INFO lines from TF's checkpoint saver
    config = trainer_flags.config_from_flags()
    from trainer.state.run_dir import RunError, check_run_folder
    from trainer.state.run_lock import check_free
    try:  # before TensorFlow loads: answered at once
        check_run_folder(config.model_dir)
        if config.distribution_strategy != "multi_worker_mirrored":  # there: the chief's lock
            check_free(config.model_dir)
    except RunError as e:
        print(f"trainer: {e}", file=sys.stderr)
        return 1
    # TensorFlow loads only now, so that flag errors above answer at once; without the C++
    # runtime's import-time lines on stderr, so that a user error is one line there.
    from trainer.tools.tool_flags import import_tensorflow
    import_tensorflow()
    from data.layout import LayoutError
    from trainer.loop.distribute import StrategyError
    from trainer.loop.controller import EXIT_PREEMPTED, Preempted
    from trainer.loop.inputs import EXIT_PEER_LOST, PeerLost, TrainingError
    from trainer.loop.train import run
    try:
        run(config)
    except PeerLost as e:
        # Exit at once: the interpreter's shutdown would wait at the cluster's shutdown
        # barrier for the peer that is gone.
        print(f"trainer: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_PEER_LOST)
    except (LayoutError, StrategyError, TrainingError, RunError) as e:
        print(f"trainer: {e}", file=sys.stderr)
        return _exit(config, 1)
    except Preempted:
        return _exit(config, EXIT_PREEMPTED)
    return _exit(config, 0)


def _exit(config, code: int) -> int:
    """With --data_service, exit at once (files are closed, the lock released): the service
    client's threads retry a lost worker or dispatcher for up to an hour, and the interpreter's
    shutdown would wait on them (trainer/loop/service_watch.py)."""
    if config.data_service:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def entry() -> None:
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=trainer_flags.parse_flags_or_exit)


if __name__ == "__main__":
    entry()
