"""Cost of exact resume: seconds from process start to the first training step's loop line,
for a fresh start and for a resume from a mid-epoch checkpoint of the same run.

    python -m bench.resume_cost -- --data_dir=DIR --model=... [trainer flags]

The trainer runs with --steps_per_loop=1, so the first console line comes right after the
first step (including tf.function tracing and, with --cache_images, decoding the whole shard).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time


def time_to_first_step(flags: list[str]) -> tuple[float, int]:
    start = time.time()
    process = subprocess.Popen([sys.executable, "-m", "trainer.main", *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if line.startswith("epoch "):
            elapsed = time.time() - start
            process.kill()
            process.wait()
            return elapsed, int(line.split()[3].split("/")[0])
    raise RuntimeError(f"the trainer exited with {process.wait()} before its first step")


def main(argv: list[str]) -> int:
    flags = [a for a in argv if a != "--"]
    with tempfile.TemporaryDirectory() as model_dir:
        common = [*flags, f"--model_dir={model_dir}", "--steps_per_loop=1"]
        fresh, _ = time_to_first_step(common + ["--train_steps=1000000"])
        # Make a checkpoint in the middle of the first epoch, then resume from it.
        subprocess.run([sys.executable, "-m", "trainer.main", *flags,
                        f"--model_dir={model_dir}", "--steps_per_loop=1", "--train_steps=3"],
                       check=True, capture_output=True)
        resumed, step = time_to_first_step(common + ["--train_steps=1000000"])
    print(f"fresh start: first step after {fresh:.1f} s")
    print(f"resume at step 3: first step (step {step}) after {resumed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
