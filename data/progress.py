"""Progress of a long start-up phase (filling a cache, the data check, packing): a console line
every few seconds with the count, the rate and the time left. A phase that ends sooner prints
nothing, so small runs stay quiet. Lines go to the given `log` (the console), never into the
TensorBoard logs."""
from __future__ import annotations

import time

EVERY_SECONDS = 5.0


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, what: str, total: int, log, unit: str = "images",
                 every: float = EVERY_SECONDS, clock=time.monotonic):
        self.what, self.total, self.log, self.unit = what, total, log, unit
        self.every, self.clock = every, clock
        self.start = self.last = clock()
        self.count = 0
        self.printed = False

    def update(self, count: int = 1) -> None:
        self.count += count
        now = self.clock()
        if self.log and now - self.last >= self.every:
            self.last = now
            self.printed = True
            self.log(f"{self.what}: {self.status(now)}")

    def status(self, now: float | None = None) -> str:
        """"count/total unit (percent, rate/s, ETA h:mm:ss)"."""
        elapsed = max((self.clock() if now is None else now) - self.start, 1e-9)
        rate = self.count / elapsed
        eta = format_duration((self.total - self.count) / rate) if rate > 0 else "?"
        return (f"{self.count:,}/{self.total:,} {self.unit} "
                f"({self.count / max(self.total, 1):.0%}, {rate:,.0f}/s, ETA {eta})")

    def close(self) -> None:
        """A closing line with the total time, only if progress lines were printed."""
        if self.printed and self.log:
            self.log(f"{self.what}: {self.count:,} {self.unit} in "
                     f"{format_duration(self.clock() - self.start)}")
