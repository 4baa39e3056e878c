#!/usr/bin/env bash
# One entry point for everything. On first use it creates .venv and installs the project into it
# (editable, with the test extra and the TensorFlow build that fits this machine).
#   ./run.sh                      train the demo (builds dataset/demo from scikit-learn's digits first)
#   ./run.sh train FLAGS...       python -m trainer.main FLAGS...
#   ./run.sh test [PYTEST ARGS]   the test suite (-m quick: the quick tier)
#   ./run.sh tensorboard [LOGDIR] TensorBoard on 127.0.0.1 (default LOGDIR: runs)
#   ./run.sh sweep FLAGS...       python -m trainer.sweep FLAGS... (Optuna; docs/sweeps.md)
#   ./run.sh download|check|pack|service|evaluate|export|predict|bench ARGS...
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python

ensure_env() {
  local stamp=.venv/.installed-$(cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
  [ -f "$stamp" ] && return 0
  [ -x "$PY" ] || python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
  local tf_extra=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then tf_extra=gpu; fi
  echo "run.sh: installing into .venv (TensorFlow build: $tf_extra)" >&2
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -e ".[test,sweep,$tf_extra]"
  rm -f .venv/.installed-*
  touch "$stamp"
}

ensure_demo_data() {
  [ -f dataset/demo/.complete ] || "$PY" -m data.demo --dest=dataset/demo
}

ensure_env
cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    ensure_demo_data
    exec "$PY" -m trainer.main --flagfile=configs/demo.cfg "$@" ;;
  train)
    if printf '%s\n' "$@" | grep -q -- 'configs/demo.cfg'; then ensure_demo_data; fi
    exec "$PY" -m trainer.main "$@" ;;
  test)
    # pytest-xdist: one worker per core (at most 4: each holds a TensorFlow runtime), a test
    # module's tests on one worker so its module-scoped runs are made once. TEST_WORKERS=0: serial.
    workers=${TEST_WORKERS:-$(n=$(nproc); echo $(( n < 4 ? n : 4 )))}
    exec "$PY" -m pytest -n "$workers" --dist loadscope "$@" ;;
  tensorboard)
    exec "$PY" -m trainer.tensorboard "$@" ;;
  sweep)
    if printf '%s\n' "$@" | grep -q -- 'configs/demo.cfg'; then ensure_demo_data; fi
    exec "$PY" -m trainer.sweep "$@" ;;
  download) exec "$PY" -m data.download "$@" ;;
  check) exec "$PY" -m data.check "$@" ;;
  pack) exec "$PY" -m data.pack "$@" ;;
  service) exec "$PY" -m data.service "$@" ;;
  evaluate|export|predict) exec "$PY" -m "trainer.$cmd" "$@" ;;
  bench) exec "$PY" -m bench.run "$@" ;;
  demo-data) exec "$PY" -m data.demo --dest=dataset/demo "$@" ;;
  *) echo "run.sh: unknown command '$cmd' (demo, train, test, tensorboard, sweep, download, check, pack, service, evaluate, export, predict, bench)" >&2; exit 2 ;;
esac
