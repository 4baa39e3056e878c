"""The ops that cost most in a trainer profile (`--profile_steps=A,B`), without TensorBoard.

    python -m bench.top_ops MODEL_DIR [--top=15]

Reads the newest `MODEL_DIR/train/plugins/profile/*/*.xplane.pb` and sums, per op type, the
*self* time of TensorFlow op events on the host threads (an op's time minus the ops nested in
it: the train loop's While op and the function-call ops would otherwise count everything
twice). Prints each type's share of all op time, its total milliseconds and its count.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import sys

from bench import OneLineErrorParser

OP_TYPE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def newest_trace(model_dir: str) -> str:
    paths = glob.glob(os.path.join(model_dir, "train", "plugins", "profile", "*",
                                   "*.xplane.pb"))
    if not paths:
        raise FileNotFoundError(f"no profile under {model_dir}/train/plugins/profile "
                                f"(train with --profile_steps=A,B)")
    return max(paths, key=os.path.getmtime)


def _op_type(name: str) -> str | None:
    """'model/conv1/Conv2D:_MklNativeConv2D' -> '_MklNativeConv2D'; None for other events."""
    if ":" not in name:
        return None
    op_name, op_type = name.rsplit(":", 1)
    if not op_name or op_name.endswith(":") or not OP_TYPE.match(op_type):
        return None
    return op_type


def _self_times(events):
    """(op type, self picoseconds) of the op events of one thread, nested ones subtracted."""
    stack: list[list] = []  # [end, op type, self time]
    for start, duration, op_type in sorted(events):
        while stack and stack[-1][0] <= start:
            yield tuple(stack.pop()[1:])
        if stack:
            stack[-1][2] -= duration
        stack.append([start + duration, op_type, duration])
    while stack:
        yield tuple(stack.pop()[1:])


def op_self_times(path: str) -> tuple[dict[str, float], dict[str, int]]:
    """Milliseconds of self time and counts per op type over the host threads."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    times: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for plane in space.planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            events = []
            for event in line.events:
                op_type = _op_type(plane.event_metadata[event.metadata_id].name)
                if op_type:
                    events.append((event.offset_ps, event.duration_ps, op_type))
            for op_type, self_ps in _self_times(events):
                times[op_type] += self_ps / 1e9
                counts[op_type] += 1
    return dict(times), dict(counts)


def table(times: dict[str, float], counts: dict[str, int], top: int) -> str:
    total = sum(times.values()) or 1.0
    lines = ["| op type | share | ms | count |", "|---|---:|---:|---:|"]
    for op_type, ms in sorted(times.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"| {op_type} | {ms / total:.1%} | {ms:.0f} | {counts[op_type]} |")
    lines.append(f"\nAll op self time: {total:.0f} ms (summed over threads).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="python -m bench.top_ops",
                                description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    try:
        path = newest_trace(args.model_dir)
    except FileNotFoundError as e:
        parser.exit(1, f"bench.top_ops: {e}\n")
    print(path)
    print(table(*op_self_times(path), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
