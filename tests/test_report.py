"""The Table-1 report from run folders' evaluation metrics."""

import json
import os

import pytest

from dice_jax.report import main as report_main
from dice_jax.report import write_report


def _run(tmp_path, name, method, evals, loss="sigmoid", round0=True):
    root = tmp_path / name
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"method": method, "round0": round0,
                                                  "train": {"loss_type": loss}}))
    for stage, (p, i, n) in evals.items():
        folder = root / stage / "eval"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"greedy": {
            "prompt_level_strict": p, "instruction_level_strict": i, "mean_length": n}}))
    return str(root)


def test_table_rows_and_plots(tmp_path):
    dice = _run(tmp_path, "dice", "dice", {"start": (0.10, 0.28, 380),
                                           "round_0": (0.20, 0.30, 400),
                                           "round_1": (0.25, 0.35, 410),
                                           "round_2": (0.30, 0.41, 420)})
    off = _run(tmp_path, "off", "offline_dpo", {"round_1": (0.21, 0.31, 450)})
    ipo = _run(tmp_path, "ipo", "dice", {"round_1": (0.22, 0.33, 430)}, loss="ipo")
    out = str(tmp_path / "report.md")
    text = write_report([dice, off, ipo], out)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1].startswith("| Start model (before round 0) | - | 10.0 | 28.0 | 380 |")
    assert rows[2].startswith("| Base (policy entering round 1) | - | 20.0 | 30.0 | 400 |")
    # Without a round 0 the start model is the base, listed once.
    solo = write_report([off], str(tmp_path / "solo.md"))
    assert "Start model" not in solo
    assert "| DICE | 1 | 25.0 | 35.0 | 410 |" in text
    assert "| DICE | 2 | 30.0 | 41.0 | 420 |" in text
    assert "| Offline DPO | 1 | 21.0 | 31.0 | 450 |" in text
    assert "| DICE (IPO) | 1 | 22.0 | 33.0 | 430 |" in text
    assert open(out).read() == text
    for suffix in ("accuracy", "length"):
        assert open(str(tmp_path / f"report_{suffix}.png"), "rb").read(4) == b"\x89PNG"


def test_report_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert report_main([str(empty), "--out", str(tmp_path / "r.md")]) == 2
    assert "no evaluations found" in capsys.readouterr().err
    bad = _run(tmp_path, "bad", "dice", {"round_1": (0.1, 0.2, 3)})
    path = os.path.join(bad, "round_1", "eval", "metrics.json")
    json.dump({"greedy": {"prompt_level_strict": 0.1}}, open(path, "w"))
    with pytest.raises(Exception, match="lack"):
        write_report([bad], str(tmp_path / "r.md"))
