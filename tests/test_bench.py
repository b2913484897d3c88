"""The benchmark's smoke mode runs end to end on the tiny model and writes every row (no timing assertions)."""

from __future__ import annotations

import json

import torch


def test_quick_benchmark_writes_every_row(tmp_path, monkeypatch, capsys):
    from benchmarks.report import row_ids
    from benchmarks.run import main

    threads = torch.get_num_threads()
    result = main(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads, "the benchmark must give the test session its threads back"

    written = list(tmp_path.glob("*.json"))
    assert len(written) == 1
    data = json.loads(written[0].read_text())
    assert data == json.loads(json.dumps(result, default=str))
    rows = {row["id"]: row for row in data["rows"]}
    assert list(rows) == row_ids()
    for id_, row in rows.items():
        assert row["value"] is not None and row["status"] != "error", f"{id_}: {row['why']}"
        assert set(row) >= {"item", "figure", "target", "value", "spread", "unit", "status", "why"}
    assert data["e2e"]["ratio"] > 0 and data["meta"]["shape"] == "tiny"
    table = capsys.readouterr().out
    assert "step ÷ floor: dreambooth" in table and str(written[0]) in table
