"""The job workdir: resolved config, metrics.jsonl, TensorBoard events, log file, progress.

Every job calls `open_workdir(path, cfg)` first. It writes `config.yaml`, sends
`logging` to `DIR/log.txt` and the console, and returns a `MetricsWriter`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Iterator

from lnfm.config import dump_yaml

log = logging.getLogger("lnfm")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary sibling then rename, so no half-written file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class _Console(logging.StreamHandler):
    """Console handler bound to whatever `sys.stderr` is when a record is emitted, not when the
    handler was made: a caller that swaps stderr (a notebook, a test capturing output) then never
    meets a handler writing to a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(workdir: Path | None = None, level: int = logging.INFO) -> None:
    root = logging.getLogger("lnfm")
    root.setLevel(level)
    root.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_lnfm_console", False) for h in root.handlers):
        console = _Console()
        console.setFormatter(fmt)
        console.addFilter(lambda record: getattr(record, "console", True))  # extra={"console": False}: file only
        console._lnfm_console = True  # type: ignore[attr-defined]
        root.addHandler(console)
    if workdir is not None:
        target = str(Path(workdir) / "log.txt")
        if not any(getattr(h, "baseFilename", None) == os.path.abspath(target) for h in root.handlers):
            fh = logging.FileHandler(target)
            fh.setFormatter(fmt)
            root.addHandler(fh)


def _json_default(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def _clean(v: Any) -> Any:
    """JSON has no NaN/Inf; write them as null so every line parses."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    """Appends one JSON object per call to metrics.jsonl (always with `step`) and
    mirrors scalars to TensorBoard. Only process 0 of a multi-host job writes."""

    def __init__(self, workdir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            if hasattr(v, "item") and getattr(v, "size", 1) == 1:
                v = v.item()
            row[k] = _clean(v)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))

    def image(self, tag: str, step: int, image_hwc: Any) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image_hwc, int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def open_workdir(workdir: str | Path, cfg: Any, *, is_main: bool = True, tensorboard: bool = True) -> MetricsWriter:
    """Create DIR, write the resolved config.yaml and start logging into DIR/log.txt."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        atomic_write_text(workdir / "config.yaml", dump_yaml(cfg))
    setup_logging(workdir if is_main else None)
    return MetricsWriter(workdir, enabled=is_main, tensorboard=tensorboard)


class progress:
    """tqdm bar on a TTY; plain log lines (about every 10% or 30 s) otherwise."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 initial: int = 0, disable: bool = False):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc = desc
        self.n = initial
        self.disable = disable
        self._bar = None
        self._t0 = time.time()
        self._last_print = self._t0
        self._last_frac = -1.0
        self._postfix = ""
        if not disable and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, initial=initial, dynamic_ncols=True)

    def __iter__(self) -> Iterator:
        for item in self.iterable:  # type: ignore[union-attr]
            yield item
            self.update(1)
        self.close()

    def set_postfix(self, **kw: Any) -> None:
        self._postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items())
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.time()
        frac = self.n / self.total if self.total else 0.0
        if self.n == self.total or frac - self._last_frac >= 0.1 or now - self._last_print >= 30:
            self._last_frac, self._last_print = frac, now
            elapsed = now - self._t0
            eta = ""
            if self.total and self.n > 0:
                eta = f" eta {elapsed / self.n * (self.total - self.n):.0f}s"
            of = f"/{self.total}" if self.total else ""
            print(f"{self.desc} {self.n}{of} ({elapsed:.0f}s{eta}) {self._postfix}".rstrip(), file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
