"""The metrics log that resumed runs read back."""

from __future__ import annotations

import pytest

from deltatune.trainer.config import ConfigError
from deltatune.trainer.report import METRICS_FILE, MetricsLog


def test_a_last_line_cut_short_is_dropped_and_resume_goes_on(tmp_path):
    log = MetricsLog(str(tmp_path))
    for step in (1, 2, 3):
        log.append({"split": "train", "step": step, "loss": 1.0 / step})
    with open(tmp_path / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write('{"split": "train", "st')  # killed mid-append
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    log.keep_until(2)
    assert (tmp_path / METRICS_FILE).read_text().count("\n") == 2
    assert [r["step"] for r in log.read()] == [1, 2]


def test_a_damaged_line_elsewhere_is_named(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"split": "train", "step": 1}\nnot json\n{"split": "train", "step": 2}\n')
    with pytest.raises(ConfigError, match="line 2 is not a JSON record"):
        MetricsLog(str(tmp_path)).read()
