"""Hyperparameter sweeps on Optuna:

    python -m trainer.sweep --flagfile=BASE --study=NAME --trials=N --space=SPACE.yaml
        [--storage=sqlite:///PATH | postgresql://...] [--param=NAME:TYPE:ARGS ...] [TRAINING FLAGS]

Each trial is an ordinary `python -m trainer.main` run (the base flags, then the trial's values)
in its own model_dir, STUDY_DIR/trial-NNN, reported to Optuna from its validation evaluations
and stopped with SIGTERM when the pruner says so. A stop signal to the sweep is passed to the
running trial, which saves a checkpoint and exits 75; the sweep then puts the trial back in the
study's queue and exits 75 too, and the next start (here or on another machine sharing the
storage) resumes it from its checkpoint. See docs/sweeps.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

from absl import flags

from trainer.config import BEST_METRICS, Config
from trainer.errors import EXIT_PREEMPTED, EXIT_USAGE, SWEEP_TRIAL_ENV  # TensorFlow-free

KINDS = ("log_uniform", "uniform", "int", "categorical")
NOT_SWEPT = ("model_dir", "list_models")  # the sweep owns model_dir; list_models trains nothing
FIELDS = tuple(field.name for field in dataclasses.fields(Config))

SWEEP = flags.FlagValues()  # the sweep's own flags; everything else is passed to the trials
flags.DEFINE_string("study", None, "The study's name (letters, digits, . _ -).", flag_values=SWEEP)
flags.DEFINE_integer("trials", None, "How many trials the study holds, all sweep processes "
                     "together; a later start with a larger number adds trials.", lower_bound=1,
                     flag_values=SWEEP)
flags.DEFINE_string("space", "", "Search space file (YAML or JSON): {FLAG: {type: log_uniform|"
                    "uniform|int|categorical, low:, high:, [step:] | choices: [...]}}.",
                    flag_values=SWEEP)
flags.DEFINE_multi_string("param", [], "One more swept flag, NAME:TYPE:ARGS: base_lr:"
                          "log_uniform:1e-4:1e-2, label_smoothing:uniform:0:0.2, train_steps:"
                          "int:100:400[:STEP], batch_size:categorical:16,32.", flag_values=SWEEP)
flags.DEFINE_string("study_dir", "", "Folder of the study's trials and summary (default "
                    "runs/sweeps/STUDY). Several machines need it on shared storage to resume "
                    "each other's trials.", flag_values=SWEEP)
flags.DEFINE_string("storage", "", "Optuna RDB storage URL shared by the sweep processes "
                    "(default sqlite:///STUDY_DIR/study.db): sqlite:///PATH on one machine, "
                    "postgresql://USER:PASS@HOST/DB or mysql://... for several.",
                    flag_values=SWEEP)
flags.DEFINE_enum("metric", "valid/accuracy", list(BEST_METRICS), "The objective: this "
                  "metric of the final valid evaluation (results.json; loss is minimised), and "
                  "the value reported at each evaluation.", flag_values=SWEEP)
flags.DEFINE_enum("pruner", "median", ["median", "asha", "none"], "Stop trials early: `median`"
                  " (below the median of the completed trials at the same step), `asha` "
                  "(asynchronous successive halving) or none.", flag_values=SWEEP)
flags.DEFINE_integer("pruner_startup_trials", 2, "median: completed trials before any pruning.",
                     lower_bound=0, flag_values=SWEEP)
flags.DEFINE_integer("pruner_warmup_steps", 0, "No pruning before this training step (asha: "
                     "its minimum resource; 0: estimated).", lower_bound=0, flag_values=SWEEP)
flags.DEFINE_integer("asha_reduction_factor", 3, "asha: 1 trial in this many goes on at each "
                     "rung.", lower_bound=2, flag_values=SWEEP)
flags.DEFINE_enum("sampler", "tpe", ["tpe", "random"], "How the values are drawn.",
                  flag_values=SWEEP)
flags.DEFINE_integer("sampler_seed", None, "Seed of the sampler (plus the number of trials "
                     "already sampled, so a restart draws new values); give each process of one "
                     "study its own.", lower_bound=0, flag_values=SWEEP)
flags.DEFINE_integer("heartbeat_seconds", 10, "A running trial's heartbeat period.",
                     lower_bound=1, flag_values=SWEEP)
flags.DEFINE_integer("stale_after_seconds", 120, "A running trial without a heartbeat for this "
                     "long lost its sweep process (killed, machine gone): it is failed and "
                     "continued in its model_dir by the next process that looks.",
                     lower_bound=2, flag_values=SWEEP)
flags.DEFINE_float("poll_seconds", 10.0, "With no trial left to start, how often to look "
                   "whether the trials running elsewhere finished (or went stale).",
                   lower_bound=0.1, flag_values=SWEEP)


class UsageError(ValueError):
    """A bad flag, space or storage: one line on stderr, exit code 2."""


# --- search space -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Param:
    """One swept training flag and its distribution."""
    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: int | None = None
    choices: tuple = ()

    def suggest(self, trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1)
        return trial.suggest_float(self.name, self.low, self.high,
                                   log=self.kind == "log_uniform")

    def probes(self) -> tuple:
        """The values that must pass the trainer's flag rules before any trial starts."""
        return self.choices if self.kind == "categorical" else (self.low, self.high)

    def spec(self) -> dict:
        """The form kept in the study: every process of a study must sweep the same space."""
        values = {"name": self.name, "type": self.kind, "low": self.low, "high": self.high,
                  "step": self.step, "choices": list(self.choices) or None}
        return {key: value for key, value in values.items() if value is not None}


def _number(value, where: str, integral: bool = False):
    """YAML reads 1e-4 as a string (it wants 1.0e-4): numbers may come as text."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (integral and number != int(number)):
        raise UsageError(f"{where}: {value!r} is not {'an integer' if integral else 'a number'}")
    return int(number) if integral else number


def _check_name(name: str, where: str) -> None:
    if name in FIELDS and name not in NOT_SWEPT:
        return
    if name in NOT_SWEPT:
        raise UsageError(f"{where}: --{name} cannot be swept (the sweep sets model_dir itself)")
    close = difflib.get_close_matches(name, FIELDS, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise UsageError(f"{where}: {name!r} is not a training flag (python -m trainer.main "
                     f"--helpfull lists them){hint}")


def make_param(name: str, spec: dict, where: str) -> Param:
    """A Param from {type, low, high[, step]} or {type: categorical, choices}; every rule of
    the space itself (not the trainer's) is checked here."""
    where = f"{where} {name}"
    _check_name(name, where)
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise UsageError(f"{where}: needs type: one of {', '.join(KINDS)}")
    kind = spec["type"]
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high"} | (
        {"step"} if kind == "int" else set())
    extra = sorted(set(spec) - allowed)
    if extra:
        raise UsageError(f"{where}: {kind} takes {', '.join(sorted(allowed - {'type'}))}, "
                         f"not {', '.join(extra)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices or not all(
                isinstance(c, (bool, int, float, str)) for c in choices):
            raise UsageError(f"{where}: categorical needs choices: a non-empty list of numbers, "
                             f"strings or booleans")
        if len(set(map(repr, choices))) != len(choices):
            raise UsageError(f"{where}: the choices repeat a value")
        return Param(name, kind, choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise UsageError(f"{where}: {kind} needs low and high")
    integral = kind == "int"
    low, high = (_number(spec[key], f"{where} {key}", integral) for key in ("low", "high"))
    if not low < high:
        raise UsageError(f"{where}: needs low < high (got low={low}, high={high})")
    if kind == "log_uniform" and low <= 0:
        raise UsageError(f"{where}: log_uniform needs low > 0 (got {low})")
    step = _number(spec["step"], f"{where} step", True) if "step" in spec else None
    if step is not None and (step < 1 or (high - low) % step):
        raise UsageError(f"{where}: step must be >= 1 and divide high - low")
    return Param(name, kind, low, high, step)


def _scalar(text: str):
    """A categorical choice given on the command line: int, float, true/false, else the text."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def param_from_flag(text: str) -> Param:
    """--param=NAME:TYPE:ARGS (ARGS: LOW:HIGH[:STEP], or choices separated by commas)."""
    parts = text.split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise UsageError(f"--param={text}: expected NAME:TYPE:ARGS, e.g. "
                         f"base_lr:log_uniform:1e-4:1e-2 or batch_size:categorical:16,32")
    name, kind, rest = parts
    if kind == "categorical":
        spec = {"type": kind, "choices": [_scalar(c) for c in rest.split(",")]}
    else:
        bounds = rest.split(":")
        if len(bounds) not in (2, 3 if kind == "int" else 2):
            raise UsageError(f"--param={text}: {kind} takes LOW:HIGH"
                             + ("[:STEP]" if kind == "int" else ""))
        spec = {"type": kind, **dict(zip(("low", "high", "step"), bounds))}
    return make_param(name, spec, "--param")


def read_space_file(path: str) -> list[Param]:
    where = f"--space={path}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"{where}: cannot read it ({e.strerror})") from None
    import yaml  # a YAML reader reads JSON too; optuna depends on PyYAML
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"{where}: not YAML or JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{where}: must map flag names to distributions, e.g. "
                         f"{{base_lr: {{type: log_uniform, low: 1.0e-4, high: 1.0e-2}}}}")
    return [make_param(str(name), spec, where) for name, spec in data.items()]


def check_against_trainer(trial_args: list[str], params: list[Param], model_dir: str) -> None:
    """The base flags, and each bound or choice of each Param, through the trainer's own flag
    rules: a space that would make trials exit 2 is refused before any starts."""
    from trainer.flags import config_from_argv  # the training flags, without TensorFlow
    base = [*trial_args, f"--model_dir={model_dir}"]
    try:
        config_from_argv(base)
    except flags.Error as e:
        raise UsageError(f"the trial flags: {_first_line(e)}") from None
    for param in params:
        for value in param.probes():
            try:
                config_from_argv([*base, f"--{param.name}={render(value)}"])
            except flags.Error as e:
                raise UsageError(f"{param.name}={render(value)} (in the space) breaks a "
                                 f"training flag rule: {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0].removeprefix("ERROR:: ")


def render(value) -> str:
    """A value as a trainer flag reads it (absl booleans: true/false; floats: exact repr)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def describe(values: dict) -> str:
    return " ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                    for name, value in values.items())


# --- command line -------------------------------------------------------------------------------
@dataclasses.dataclass
class Options:
    study: str
    trials: int
    space: list[Param]
    trial_args: list[str]  # --flagfile=... and training flags, in the order given
    study_dir: str
    storage: str


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """The sweep's own flags, and the rest (the trials' --flagfile and training flags)."""
    mine, theirs = [], []
    for arg in argv:
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r} (flags look like --name=value)")
        name = arg[2:].split("=", 1)[0]
        own = name in SWEEP or (name.startswith("no") and name[2:] in SWEEP)
        (mine if own else theirs).append(arg)
    return mine, theirs


def parse_args(argv: list[str]) -> Options:
    mine, theirs = split_argv(argv)
    try:
        SWEEP.unparse_flags()
        SWEEP(["sweep", *mine])
    except flags.Error as e:
        raise UsageError(f"flag error: {_first_line(e)}") from None
    for required in ("study", "trials"):
        if SWEEP[required].value is None:
            raise UsageError(f"--{required} is required")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", SWEEP.study) or SWEEP.study in (".", ".."):
        raise UsageError(f"--study={SWEEP.study}: use letters, digits, '.', '_' and '-' "
                         f"(it names a folder)")
    space = read_space_file(SWEEP.space) if SWEEP.space else []
    space += [param_from_flag(text) for text in SWEEP.param]
    if not space:
        raise UsageError("give a search space: --space=FILE and/or --param=NAME:TYPE:ARGS")
    names = [p.name for p in space]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"{', '.join(twice)} swept twice (--space and --param together)")
    study_dir = SWEEP.study_dir or os.path.join("runs", "sweeps", SWEEP.study)
    check_against_trainer(theirs, space, os.path.join(study_dir, "trial-000"))
    storage = SWEEP.storage or "sqlite:///" + os.path.abspath(os.path.join(study_dir,
                                                                          "study.db"))
    return Options(SWEEP.study, SWEEP.trials, space, theirs, study_dir, storage)


# --- storage and study --------------------------------------------------------------------------
class StorageError(RuntimeError):
    """The storage cannot be opened or used, or the study is not a sweep's: exit code 1."""


@contextlib.contextmanager
def _file_lock(path: str):
    import fcntl
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def serialize_sqlite(engine) -> None:
    """pysqlite opens a transaction only at the first write, so Optuna's read-then-update of a
    trial's state (claiming a waiting trial, failing a stale one) is not atomic across
    processes: two sweeps could claim one trial. BEGIN IMMEDIATE takes the database's write
    lock at the start of every transaction (SQLAlchemy's recipe for pysqlite). Server
    databases need nothing: Optuna reads the row with SELECT ... FOR UPDATE."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the hooks would still begin lazily


def open_storage(url: str, heartbeat: int, stale_after: int):
    """Optuna's RDB storage with heartbeats; stale trials are continued (continue_stale_trial)."""
    import optuna
    import sqlalchemy
    # Heartbeats and fail_stale_trials are marked experimental (since Optuna 2.9); the sweep
    # needs them, and its users cannot act on the warning.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise UsageError(f"--storage={url}: not a database URL (sqlite:///PATH, "
                         f"postgresql://USER:PASSWORD@HOST/DB, mysql://...)") from None
    shown = parsed.render_as_string(hide_password=True)
    sqlite = parsed.get_backend_name() == "sqlite"
    lock = contextlib.nullcontext()
    if sqlite:
        if parsed.database in (None, "", ":memory:"):
            raise UsageError(f"--storage={shown}: SQLite needs a file (the sweeps share it)")
        folder = os.path.dirname(os.path.abspath(parsed.database))
        if not os.path.isdir(folder):
            raise UsageError(f"--storage={shown}: no such folder {folder}")
        # Two processes creating one new database race on its tables (optuna issue 4621).
        lock = _file_lock(os.path.abspath(parsed.database) + ".lock")
    try:
        with lock:
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None,
                heartbeat_interval=heartbeat, grace_period=stale_after,
                heartbeat_stale_trial_callback=continue_stale_trial)
    except (ImportError, sqlalchemy.exc.SQLAlchemyError,
            optuna.exceptions.StorageInternalError) as e:
        raise StorageError(f"--storage={shown}: cannot open it ({_first_line(e)})") from None
    if sqlite:
        serialize_sqlite(storage.engine)
    return storage, shown


def make_pruner():
    import optuna
    if SWEEP.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=SWEEP.pruner_startup_trials,
                                           n_warmup_steps=SWEEP.pruner_warmup_steps)
    if SWEEP.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=SWEEP.pruner_warmup_steps or "auto",
            reduction_factor=SWEEP.asha_reduction_factor)
    return optuna.pruners.NopPruner()


def make_sampler(seed: int | None):
    import optuna
    if SWEEP.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def open_study(options: Options, storage):
    """Create the study (and its trials, see plan_trials) or load it; its sampler is seeded
    past the trials already sampled, so a restarted sweep does not draw the same values."""
    import optuna
    direction = "minimize" if BEST_METRICS[SWEEP.metric] == "min" else "maximize"
    try:
        study = optuna.create_study(study_name=options.study, storage=storage,
                                    direction=direction, pruner=make_pruner())
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=options.study, storage=storage,
                                  pruner=make_pruner())
        created = False
    plan_trials(study, options, created)
    sampled = sum(1 for trial in study.get_trials(deepcopy=False) if trial.params)
    seed = SWEEP.sampler_seed
    study.sampler = make_sampler(None if seed is None else seed + sampled)
    return study


def plan_trials(study, options: Options, created: bool) -> None:
    """The study's N trials are queued (waiting, no values yet) once, by the process that
    created the study: sweeps that each asked for a trial while fewer than N existed would
    overshoot N when they start together. Values are drawn when a trial is claimed."""
    identity = {"space": [param.spec() for param in options.space], "metric": SWEEP.metric}
    if created:
        for key, value in identity.items():
            study.set_user_attr(key, value)
        planned = 0
    else:
        planned = _wait_for_plan(study, options.study)
        for key, value in identity.items():
            if study.user_attrs.get(key) != value:
                raise UsageError(f"study {options.study} sweeps another {key} "
                                 f"({json.dumps(study.user_attrs.get(key))}); give this sweep "
                                 f"another --study")
    for _ in range(options.trials - planned):
        study.enqueue_trial({})
    if options.trials > planned:
        study.set_user_attr("trials", options.trials)  # last: other processes wait for it
    elif options.trials < planned:
        print(f"sweep: study {options.study} already holds {planned} trials; "
              f"--trials={options.trials} removes none", flush=True)


def _wait_for_plan(study, name: str, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while "trials" not in study.user_attrs:
        if study.get_trials(deepcopy=False) and "space" not in study.user_attrs:
            raise StorageError(f"study {name} exists and was not made by trainer.sweep; give "
                               f"another --study")
        if time.time() > deadline:
            raise StorageError(f"study {name} exists but its trials were never queued (the "
                               f"process creating it stopped?); delete it (optuna delete-study"
                               f") or give another --study")
        time.sleep(0.5)
    return study.user_attrs["trials"]


def continue_stale_trial(study, frozen) -> None:
    """Optuna has failed `frozen`: its sweep process stopped sending heartbeats (killed, its
    machine lost). A new trial with the same values continues it in the same model_dir, where
    the trainer resumes from its checkpoint (and the new trial takes its evaluations)."""
    folder = frozen.user_attrs.get("model_dir")
    if folder is None:  # lost before its trainer started: a fresh trial takes its place
        study.enqueue_trial({})
        return
    study.enqueue_trial(frozen.params, user_attrs={"model_dir": folder,
                                                   "continues": frozen.number})


def claim_trial(study):
    """A waiting trial of the study, now running for this process, or None. Optuna's
    study.ask() would create a trial when none waits. A candidate's heartbeat is refreshed
    before it is claimed: a trial put back by a stopped sweep keeps its old heartbeat, and
    another process's stale check would fail it as soon as it ran again."""
    import optuna
    from optuna.trial import TrialState
    storage = study._storage
    optuna.storages.fail_stale_trials(study)  # queues their continuations
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        storage.record_heartbeat(frozen._trial_id)
        try:
            if storage.set_trial_state_values(frozen._trial_id, TrialState.RUNNING):
                return optuna.Trial(study, frozen._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished by another process since the list was read
    return None


# --- running a trial ----------------------------------------------------------------------------
class Signals:
    """SIGTERM/SIGINT are remembered and passed on to the running trainer as a SIGTERM (it
    finishes its loop, saves a checkpoint and exits 75); the sweep then stops with 75 too."""

    def __init__(self):
        self.received: int | None = None
        self.child: subprocess.Popen | None = None
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGTERM, signal.SIGINT)}

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame):
        second = self.received is not None
        self.received = signum
        if self.child is not None:  # a trial takes no second signal itself (errors.py)
            self.child.kill() if second else self.child.send_signal(signal.SIGTERM)

    def sleep(self, seconds: float) -> None:
        deadline = time.time() + seconds
        while self.received is None and time.time() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.time())))


class Heartbeat:
    """Records the running trial's heartbeat every `seconds` in a thread, so that the other
    sweep processes can tell a trial whose process was lost (its heartbeat goes stale)."""

    def __init__(self, storage, trial_id: int, seconds: float):
        self._beat = lambda: storage.record_heartbeat(trial_id)
        self._seconds, self._stop = seconds, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(self._seconds):
            try:
                self._beat()
            except Exception:  # a storage hiccup: the trial goes stale only after many misses
                pass


@dataclasses.dataclass
class Context:
    options: Options
    study: object
    signals: Signals
    metric: str


@dataclasses.dataclass
class Outcome:
    """What the trainer process did: its exit code and what the sweep read from its output."""
    code: int
    reported: set
    pruned: bool = False
    seconds: float = 0.0  # the trainer process's life
    last_step: int = 0
    error: str = ""


# The trainer's console (trainer/report/console.py): a line per loop, then one per evaluation.
_LOOP_LINE = re.compile(r"epoch \d+ step (\d+)/\d+ ")
_EVAL_LINE = re.compile(r"  valid loss (\S+) acc (\S+)(?: bal acc (\S+))? top5 ")
_COLUMN = {"valid/loss": 1, "valid/accuracy": 2, "valid/balanced_accuracy": 3}
_LIBC = None


def _die_with_parent() -> None:
    """In the trainer's process before exec: a SIGTERM when the sweep dies (Linux). A trainer
    left running by a killed sweep would train on in the model_dir that a restarted sweep
    resumes; with SIGTERM it saves a checkpoint and exits 75 instead."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def trial_command(trial_args: list[str], model_dir: str, values: dict) -> list[str]:
    return [sys.executable, "-m", "trainer.main", *trial_args, f"--model_dir={model_dir}",
            *(f"--{name}={render(value)}" for name, value in values.items())]


def run_trial(ctx: Context, trial, claimed_at: float) -> str:
    """Draws (or, for a resumed trial, reads back) the trial's values, runs its trainer in
    STUDY_DIR/<its folder> and tells Optuna the outcome: complete, pruned, failed, or stopped
    (put back in the queue)."""
    values = {param.name: param.suggest(trial) for param in ctx.options.space}
    folder = trial.user_attrs.get("model_dir") or f"trial-{trial.number:03d}"
    trial.set_user_attr("model_dir", folder)
    _carry_over_evaluations(ctx.study, trial)
    model_dir = os.path.join(ctx.options.study_dir, folder)
    resuming = os.path.isdir(os.path.join(model_dir, "checkpoints"))
    print(f"trial {trial.number}: {describe(values)} in {model_dir}"
          + (" (resuming from its checkpoint)" if resuming else ""), flush=True)
    argv = trial_command(ctx.options.trial_args, model_dir, values)
    outcome = watch(ctx, trial, argv, model_dir)
    attrs = trial.user_attrs
    trial.set_user_attr("trainer_seconds", attrs.get("trainer_seconds", 0) + outcome.seconds)
    trial.set_user_attr("sweep_seconds", attrs.get("sweep_seconds", 0)
                        + time.time() - claimed_at - outcome.seconds)
    return conclude(ctx, trial, outcome, model_dir)


def _carry_over_evaluations(study, trial) -> None:
    """A continuation of a lost trial takes its evaluations, for the pruner and the table."""
    number = trial.user_attrs.get("continues")
    if number is None:
        return
    lost = study.get_trials(deepcopy=False)[number]  # a study's trials are listed by number
    done = trial.storage.get_trial(trial._trial_id).intermediate_values
    for step, value in lost.intermediate_values.items():
        if step not in done:
            trial.report(value, step)


def watch(ctx: Context, trial, argv: list[str], model_dir: str) -> Outcome:
    """Runs the trainer, its output appended to model_dir/sweep.log; reports each valid
    evaluation and stops the trainer (SIGTERM) when the pruner says so."""
    reported = set(trial.storage.get_trial(trial._trial_id).intermediate_values)
    outcome = Outcome(EXIT_PREEMPTED, reported)
    if ctx.signals.received is not None:
        return outcome  # stopped between the claim and the start: back in the queue
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, "sweep.log")
    # A file, not a pipe: the trainer of a killed sweep must still be able to print while it
    # saves its checkpoint (a broken pipe would end it at its next line).
    with open(path, "ab") as log, open(path, "rb") as tail:
        tail.seek(0, os.SEEK_END)
        started = time.time()
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                 env=dict(os.environ, **{SWEEP_TRIAL_ENV: "1"}),
                                 preexec_fn=_die_with_parent)
        ctx.signals.child = child
        # The heartbeat thread starts after the fork: a preexec_fn must not run in a copy of
        # a process whose other threads may hold locks (claim_trial gave a fresh beat).
        try:
            with Heartbeat(trial.storage, trial._trial_id, SWEEP.heartbeat_seconds):
                if ctx.signals.received is not None:  # the signal came during Popen
                    child.send_signal(signal.SIGTERM)
                for line in follow(tail, child):
                    _read_line(ctx, trial, line, outcome, child)
        except BaseException:
            child.send_signal(signal.SIGTERM)  # a storage error here: do not train on alone
            raise
        finally:
            outcome.code = child.wait()
            ctx.signals.child = None
            outcome.seconds = time.time() - started
    return outcome


def follow(handle, child: subprocess.Popen, pause: float = 0.1):
    """The lines `child` appends to the file open in `handle`, until it exits."""
    pending = b""
    while True:
        chunk = handle.readline()
        if chunk:
            pending += chunk
            if pending.endswith(b"\n"):
                yield pending.decode("utf-8", "replace")
                pending = b""
        elif child.poll() is None:
            time.sleep(pause)
        else:
            pending += handle.read()  # all of it is in the file once the process has exited
            yield from pending.decode("utf-8", "replace").splitlines(keepends=True)
            return


def _read_line(ctx: Context, trial, line: str, outcome: Outcome, child) -> None:
    loop = _LOOP_LINE.match(line)
    if loop:
        outcome.last_step = int(loop.group(1))
        return
    if line.startswith("trainer: "):  # the trainer's one-line errors
        outcome.error = line.strip()
        return
    evaluation = _EVAL_LINE.match(line)
    step = outcome.last_step
    if not evaluation or evaluation.group(_COLUMN[ctx.metric]) is None or step == 0 or \
            step in outcome.reported:
        return
    value = float(evaluation.group(_COLUMN[ctx.metric]))
    trial.report(value, step)
    outcome.reported.add(step)
    verdict = ""
    if not outcome.pruned and ctx.signals.received is None and trial.should_prune():
        outcome.pruned = True
        child.send_signal(signal.SIGTERM)
        verdict = ": pruned, stopping its trainer"
    print(f"trial {trial.number} step {step}: {ctx.metric} {value:.4f}{verdict}", flush=True)


def conclude(ctx: Context, trial, outcome: Outcome, model_dir: str) -> str:
    from optuna.trial import TrialState
    number = trial.number
    if outcome.code == 0:
        return _complete(ctx, trial, outcome, model_dir)
    if outcome.code == EXIT_PREEMPTED and outcome.pruned:
        ctx.study.tell(trial, state=TrialState.PRUNED)
        print(f"trial {number}: pruned at step {max(outcome.reported)}", flush=True)
        return "pruned"
    if outcome.code == EXIT_PREEMPTED:  # the sweep's stop, or a signal to the trainer itself
        trial.storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
        print(f"trial {number}: stopped after step {outcome.last_step}; it waits in the queue "
              f"and resumes from its checkpoint in {model_dir}", flush=True)
        return "stopped"
    reason = outcome.error or (f"killed by signal {-outcome.code}" if outcome.code < 0
                               else f"exit code {outcome.code}")
    return _fail(ctx, trial, reason, model_dir)


def _fail(ctx: Context, trial, reason: str, model_dir: str) -> str:
    from optuna.trial import TrialState
    trial.set_user_attr("error", reason)
    ctx.study.tell(trial, state=TrialState.FAIL)
    print(f"trial {trial.number}: failed ({reason}; the trainer's output: "
          f"{os.path.join(model_dir, 'sweep.log')})", flush=True)
    return "failed"


def _complete(ctx: Context, trial, outcome: Outcome, model_dir: str) -> str:
    """The objective: the metric of results.json's final valid evaluation, also reported at
    the last step (where the pruner compares finished trials)."""
    split, key = ctx.metric.split("/")
    try:
        with open(os.path.join(model_dir, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
        value, steps = float(results["splits"][split][key]), int(results["steps"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return _fail(ctx, trial, f"no {ctx.metric} in its results.json ({e})", model_dir)
    if steps not in outcome.reported:
        trial.report(value, steps)
    ctx.study.tell(trial, value)
    attrs = trial.storage.get_trial(trial._trial_id).user_attrs
    print(f"trial {trial.number}: complete, {ctx.metric} {value:.4f} after {steps} steps "
          f"(trainer {attrs['trainer_seconds']:.1f} s, sweep {attrs['sweep_seconds']:.2f} s)",
          flush=True)
    return "complete"


# --- the study's end ----------------------------------------------------------------------------
def _state(trial, continued_as: dict) -> str:
    state = trial.state.name.lower()
    if trial.number in continued_as:
        return f"{state} (lost; continued as trial {continued_as[trial.number]})"
    if "error" in trial.user_attrs:
        return f"{state}: {trial.user_attrs['error']}"
    return state


def trial_rows(ctx: Context) -> list[dict]:
    rows, trials = [], ctx.study.get_trials(deepcopy=False)
    continued_as = {t.user_attrs["continues"]: t.number for t in trials
                    if "continues" in t.user_attrs}
    for trial in trials:
        steps = max(trial.intermediate_values, default=None)
        rows.append({"number": trial.number, "state": _state(trial, continued_as),
                     "value": trial.value, "params": trial.params, "steps": steps,
                     "model_dir": trial.user_attrs.get("model_dir"),
                     "trainer_seconds": trial.user_attrs.get("trainer_seconds"),
                     "sweep_seconds": trial.user_attrs.get("sweep_seconds"),
                     "evaluations": {str(k): v for k, v in
                                     sorted(trial.intermediate_values.items())}})
    return rows


def _cell(value, digits: str = ".4g") -> str:
    text = "" if value is None else format(value, digits) if isinstance(value, float) \
        else str(value)
    return text.replace("|", "\\|")  # a trainer's error line must not split the row


def comparison_table(ctx: Context, rows: list[dict], best: int | None) -> str:
    names = [param.name for param in ctx.options.space]
    head = ["trial", "state", ctx.metric, *names, "steps", "trainer s", "sweep s", "model_dir"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        mark = " (best)" if row["number"] == best else ""
        cells = [f"{row['number']}{mark}", row["state"], _cell(row["value"], ".4f"),
                 *(_cell(row["params"].get(name)) for name in names), _cell(row["steps"]),
                 _cell(row["trainer_seconds"], ".1f"), _cell(row["sweep_seconds"], ".2f"),
                 _cell(row["model_dir"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(ctx: Context) -> int:
    """Prints the best trial, its flags and the comparison table, and writes them to
    STUDY_DIR/summary.md, summary.json and best.cfg (a flagfile that repeats the best trial)."""
    from optuna.trial import TrialState
    rows = trial_rows(ctx)
    complete = ctx.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = ctx.study.best_trial if complete else None
    counts = {}
    for row in rows:
        state = row["state"].split()[0].rstrip(":")
        counts[state] = counts.get(state, 0) + 1
    lines = [f"study {ctx.options.study}: {len(rows)} trials ("
             + ", ".join(f"{n} {state}" for state, n in counts.items()) + ")"]
    flagfile = None
    if best is not None:
        flag_lines = [*ctx.options.trial_args,
                      *(f"--{name}={render(value)}" for name, value in best.params.items())]
        flagfile = "\n".join(flag_lines)
        lines += [f"best trial: {best.number} ({ctx.metric} {best.value:.4f}) in "
                  f"{os.path.join(ctx.options.study_dir, best.user_attrs['model_dir'])}",
                  f"best flags: {' '.join(flag_lines)}"]
    text = "\n".join(lines) + "\n\n" + comparison_table(
        ctx, rows, best.number if best else None) + "\n"
    _write_summary(ctx, text, rows, best, flagfile)
    print(text, flush=True)
    if best is None:
        print("sweep: no trial completed", file=sys.stderr)
        return 1
    return 0


def _write_summary(ctx: Context, text: str, rows: list[dict], best, flagfile) -> None:
    folder = ctx.options.study_dir
    summary = {"study": ctx.options.study, "metric": ctx.metric,
               "direction": ctx.study.direction.name.lower(), "trials": rows,
               "best": None if best is None else {"number": best.number, "value": best.value,
                                                  "params": best.params,
                                                  "model_dir": best.user_attrs["model_dir"]}}
    outputs = {"summary.md": text, "summary.json": json.dumps(summary, indent=2) + "\n"}
    if flagfile is not None:
        outputs["best.cfg"] = (f"# The best trial ({best.number}) of study {ctx.options.study}:"
                               f" {ctx.metric} {best.value:.4f}\n{flagfile}\n")
    for name, content in outputs.items():
        temporary = os.path.join(folder, f".{name}.{os.getpid()}")
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(temporary, os.path.join(folder, name))  # two sweeps may finish together


# --- main ---------------------------------------------------------------------------------------
def run_sweep(ctx: Context) -> int:
    """Claims and runs waiting trials until none is left; waits for the trials still running
    elsewhere (one of them may go stale and come back), then summarizes."""
    from optuna.trial import TrialState
    said_waiting, stopped = False, False
    while ctx.signals.received is None and not stopped:
        claimed_at = time.time()
        trial = claim_trial(ctx.study)
        if trial is not None:
            said_waiting = False
            stopped = run_trial(ctx, trial, claimed_at) == "stopped"
            continue
        running = [t.number for t in ctx.study.get_trials(deepcopy=False,
                                                          states=(TrialState.RUNNING,))]
        if not running:
            break
        if not said_waiting:
            print(f"sweep: no trial left to start; waiting for trial(s) "
                  f"{', '.join(map(str, running))} running elsewhere", flush=True)
            said_waiting = True
        ctx.signals.sleep(SWEEP.poll_seconds)
    if stopped or ctx.signals.received is not None:
        print("sweep: stopped; start the same command again to continue the study",
              flush=True)
        return EXIT_PREEMPTED
    return summarize(ctx)


def start(options: Options, signals: Signals) -> Context:
    import optuna
    global _LIBC
    if sys.platform.startswith("linux"):
        import ctypes
        _LIBC = ctypes.CDLL(None)  # loaded here: the child must not import between fork and exec
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
    os.makedirs(options.study_dir, exist_ok=True)
    storage, shown = open_storage(options.storage, SWEEP.heartbeat_seconds,
                                  SWEEP.stale_after_seconds)
    study = open_study(options, storage)
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    print(f"sweep: study {options.study} in {shown}: {len(states)} trials ("
          + ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
          + f"); their runs in {options.study_dir}", flush=True)
    return Context(options, study, signals, SWEEP.metric)


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help", "--helpfull", "-?") for arg in argv):
        print(__doc__.strip() + "\n\nflags:\n" + SWEEP.get_help())
        return 0
    try:
        options = parse_args(argv)
        try:
            import optuna
            import sqlalchemy
        except ImportError:
            raise StorageError("optuna is not installed: pip install -e '.[sweep]' (./run.sh "
                               "sweep installs it)") from None
        signals = Signals()  # from here on: a stop while the study opens is an exit 75 too
        try:
            return run_sweep(start(options, signals))
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
            raise StorageError(f"the storage failed: {_first_line(e)}") from None
        finally:
            signals.close()
    except UsageError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StorageError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
