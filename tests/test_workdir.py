"""Workdir outputs: resolved config, metrics.jsonl, TensorBoard events, plain progress lines."""

import dataclasses
import json

from lnfm import workdir as W
from lnfm.config import load_config


@dataclasses.dataclass
class Cfg:
    steps: int = 3
    lr: float = 0.5


def test_open_workdir_writes_config_and_metrics(tmp_path):
    cfg = Cfg(steps=4)
    writer = W.open_workdir(tmp_path / "run", cfg)
    writer.write(1, loss=2.5, lr=0.1)
    writer.write(2, loss=float("nan"))
    writer.close()
    assert load_config(Cfg, str(tmp_path / "run" / "config.yaml")) == cfg
    rows = W.read_metrics(tmp_path / "run")
    assert rows[0] == {"step": 1, "loss": 2.5, "lr": 0.1}
    assert rows[1]["loss"] is None  # NaN is not JSON; every line must parse
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert (tmp_path / "run" / "log.txt").exists()
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_progress_plain_lines_when_not_tty(capsys):
    bar = W.progress(range(20), desc="convert")
    assert list(bar) == list(range(20))
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("convert 20/20")
    assert 2 <= len(err) <= 12  # about every 10%, not one line per item


def test_atomic_write_leaves_no_temp(tmp_path):
    W.atomic_write_text(tmp_path / "a" / "x.json", "{}")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]
