"""Training progress as a person reads it: one line updating in place on a terminal, plain lines everywhere else.

The training loop emits small events (a dict) through a `Progress` callable; rank 0 only. In one process the events go
straight to a `ProgressDisplay`; under Ray Train they travel from the rank-0 worker to the driver through a queue (see
`training/ray_job.py`), so the bar is drawn by the process that owns the terminal, not forwarded line by line.

Events: {"event": "start", "step", "total", "runtime"} once, {"event": "step", "step"} as steps finish (throttled by
the sender) and {"event": "metrics", "step", "metrics"} every `log_every` steps.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

Progress = Callable[[dict[str, Any]], None]


def postfix(metrics: dict[str, Any]) -> str:
    """`loss 3.214 lr 4.9e-04 T 0.071 172 samples/s wait 1%` from a metrics record."""
    return (f"loss {metrics['loss']:.3f} lr {metrics['lr']:.1e} T {metrics['temperature']:.3f} "
            f"{metrics['samples_per_second']:.0f} samples/s wait {metrics['data_wait_share']:.0%}")


class ProgressDisplay:
    """Renders progress events: a tqdm bar on a terminal; on a pipe or a log (CI, Prefect), one plain line per
    metrics record (`train step 40/108 (37%) loss ...`), so nothing is repeated and nothing is a carriage return."""

    def __init__(self, stream: TextIO | None = None, label: str = "train"):
        self.stream = stream or sys.stderr
        self.label = label
        self.interactive = self.stream.isatty()
        self.bar: tqdm | None = None
        self.total = 0

    def __call__(self, event: dict[str, Any]) -> None:
        kind, step = event["event"], event["step"]
        if kind == "start":
            self.total = event["total"]
            print(f"{self.label}: {event['runtime']}; step {step} of {self.total}", file=self.stream, flush=True)
            if self.interactive:
                self.bar = tqdm(total=self.total, initial=step, desc=self.label, unit="step", file=self.stream,
                                dynamic_ncols=True)
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if kind == "metrics":
                self.bar.set_postfix_str(postfix(event["metrics"]))
        elif kind == "metrics":
            share = step / self.total if self.total else 0.0
            print(f"{self.label} step {step}/{self.total} ({share:.0%}) {postfix(event['metrics'])}", file=self.stream,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def throttled(send: Progress, interval: float = 0.5) -> Progress:
    """Pass on every start and metrics event, and step events at most every `interval` seconds."""
    last = [0.0]

    def emit(event: dict[str, Any]) -> None:
        now = time.monotonic()
        if event["event"] != "step" or now - last[0] >= interval:
            last[0] = now
            send(event)

    return emit
