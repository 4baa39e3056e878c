"""Train an image classifier: python -m trainer.main --flagfile=configs/NAME.cfg [FLAGS...]

Exit codes: trainer/errors.py (0 finished, 1 error, 2 usage, 69 peer lost, 74 disk full or
read-only, 75 stopped by a signal with what is complete kept, 130/143 a second signal)."""
from __future__ import annotations

import atexit
import os
import sys

from absl import app, logging

from trainer import errors
from trainer import flags as trainer_flags
from trainer.errors import INTERRUPTS


def main(argv: list[str]) -> int:
    # First thing: from here on a SIGTERM/SIGINT in any phase ends with exit 75 (errors.py).
    INTERRUPTS.install()
    if len(argv) > 1:
        print(f"trainer: unexpected arguments {argv[1:]} (flags look like --name=value)",
              file=sys.stderr)
        return errors.EXIT_USAGE
    if not trainer_flags.flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # absl INFO lines from TF's checkpoint saver
    config = trainer_flags.config_from_flags()
    try:
        code = _train(config)
    except errors.Interrupted as e:
        code = _interrupted(config, e.signal)
    return _exit(config, code)


def _train(config) -> int:
    from trainer.state.run_dir import RunError, check_run_folder
    from trainer.state.run_lock import check_free
    try:  # before TensorFlow loads: answered at once
        check_run_folder(config.model_dir)
        if config.distribution_strategy != "multi_worker_mirrored":  # there: the chief's lock
            check_free(config.model_dir)
    except RunError as e:
        print(f"trainer: {e}", file=sys.stderr)
        return errors.EXIT_FAILURE
    # TensorFlow loads only now, so that flag errors above answer at once; without the C++
    # runtime's import-time lines on stderr, so that a user error is one line there.
    from trainer.tools.tool_flags import import_tensorflow
    import_tensorflow()
    from data.layout import LayoutError
    from trainer.loop.distribute import StrategyError
    from trainer.loop.train import run
    try:
        run(config)
    except errors.PeerLost as e:
        # Exit at once: the interpreter's shutdown would wait at the cluster's shutdown
        # barrier for the peer that is gone.
        _exit_now(f"trainer: {e}", errors.EXIT_PEER_LOST)
    except errors.Preempted:
        return errors.EXIT_PREEMPTED
    except Exception as e:  # noqa: BLE001 (a full disk can surface as any of them)
        disk = errors.disk_error(e)
        if disk:
            return _disk_full(config, *disk)
        if isinstance(e, (LayoutError, StrategyError, errors.TrainingError, RunError)):
            print(f"trainer: {e}", file=sys.stderr)
            return errors.EXIT_FAILURE
        raise
    return 0


def _exit(config, code: int) -> int:
    """Exit at once, the run's files closed and its lock released: the interpreter's shutdown of
    TensorFlow adds 1.5 s (4 s on a loaded machine; measured 2026-12-04) and, with
    --data_service, waits on the service client's threads, which retry a lost worker or
    dispatcher for up to an hour (trainer/loop/service_watch.py). The atexit functions still run
    (logging, weakref finalizers). A multi-worker run without the service ends the usual way:
    its shutdown is the cluster's barrier, where the workers finish together."""
    if config.data_service or config.distribution_strategy != "multi_worker_mirrored":
        atexit._run_exitfuncs()
        _exit_now(None, code)
    return code


def _kept(config) -> str:
    """What a stop leaves to resume from: the newest checkpoint, by the run's state file."""
    from trainer.state import run_dir
    latest = run_dir.latest_checkpoint(os.path.join(config.model_dir, run_dir.CHECKPOINT_DIR))
    if latest is None:
        return f"{config.model_dir} holds no checkpoint yet"
    return f"the checkpoints up to {latest} are intact"


def _disk_full(config, reason: str, path: str) -> int:
    line = f"trainer: {errors.disk_line(reason, path, _kept(config))}"
    if config.distribution_strategy == "multi_worker_mirrored":
        _exit_now(line, errors.EXIT_DISK)  # not at the shutdown barrier with its peers
    print(line, file=sys.stderr)
    return errors.EXIT_DISK


def _interrupted(config, sig: int) -> int:
    """A signal in a set-up phase (before the loop): the phase is abandoned; the run folder
    keeps what it had (files are published whole, by rename)."""
    line = (f"trainer: stopped by signal {sig} outside the training loop (that phase abandoned); "
            f"{_kept(config)}; run again with the same --model_dir to go on (exit code "
            f"{errors.EXIT_PREEMPTED})")
    if config.distribution_strategy == "multi_worker_mirrored":
        _exit_now(line, errors.EXIT_PREEMPTED)
    print(line, file=sys.stderr, flush=True)
    return errors.EXIT_PREEMPTED


def _exit_now(line: str | None, code: int) -> None:
    """Exit without the interpreter's shutdown, `line` (if any) on stderr, both streams flushed."""
    if line:
        print(line, file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


def entry() -> None:
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=trainer_flags.parse_flags_or_exit)


if __name__ == "__main__":
    entry()
