"""scripts/bench_text.py's journal: results survive a stopped run and ``--resume`` trains only what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from script_modules import load_script


def _bench(argv: list[str]) -> int:
    return load_script("bench_text").main(argv)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_journal_keeps_each_result_and_resume_reuses_only_comparable_ones(
        sample_data: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "bench_text.md"
    journal = tmp_path / "bench_text.jsonl"
    data = ["--db-url", sample_data["db_url"], "--images", sample_data["image_location"], "--output", str(report)]
    rows = ["--rows", "tfidf-svm", "tfidf-svm-plain"]

    assert _bench([*data, *rows, "--seeds", "0", "1"]) == 0
    entries = _lines(journal)
    assert [(e["seed"], e["model"]) for e in entries] == [
        (0, "tfidf-svm"), (0, "tfidf-svm-plain"), (1, "tfidf-svm"), (1, "tfidf-svm-plain")]
    assert all(0.0 <= e["scores"]["accuracy"] <= 1.0 for e in entries)

    # A marked result proves that --resume reads the journal instead of training again.
    entries[0]["scores"]["accuracy"] = 0.125
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries))
    capsys.readouterr()
    assert _bench([*data, *rows, "--seeds", "0", "1", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "seed 0 tfidf-svm: accuracy 0.1250" in out and "(from the journal)" in out
    assert "seed 2 tfidf-svm: accuracy" in out and "seed 2 tfidf-svm: accuracy 0.1250" not in out
    assert len(_lines(journal)) == 6
    assert "4 of the 6 (seed, model) runs were taken from the journal" in report.read_text()

    # Another split is not comparable: nothing is reused, and the new results join the journal.
    assert _bench([*data, *rows, "--seeds", "0", "--test-fraction", "0.2", "--resume"]) == 0
    assert "(from the journal)" not in capsys.readouterr().out and len(_lines(journal)) == 8
    # So is a word2vec trained another way (plain, without class pseudo-words).
    assert _bench([*data, *rows, "--seeds", "0", "--label-interval", "0", "--resume"]) == 0
    assert "(from the journal)" not in capsys.readouterr().out and len(_lines(journal)) == 10
    assert _lines(journal)[-1]["setup"]["label_interval"] == 0 and entries[0]["setup"]["label_interval"] == 3
    assert "plain (`--label-interval 0`" in report.read_text()

    # Without --resume a run starts its journal afresh.
    assert _bench([*data, "--rows", "tfidf-svm", "--seeds", "0"]) == 0
    assert len(_lines(journal)) == 1 and _lines(journal)[0]["scores"]["accuracy"] != 0.125

    journal.write_text(journal.read_text() + "{not json\n")
    capsys.readouterr()
    assert _bench([*data, "--rows", "tfidf-svm", "--seeds", "0", "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"{journal}, line 2: not a JSON result" in err and "Traceback" not in err
