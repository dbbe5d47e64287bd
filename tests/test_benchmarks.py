"""What the benchmarks share: the result journal (results survive a stopped run, ``--resume`` trains only what is
missing), report tables, and scripts/bench_text.py end to end with its journal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from marketplace_reco.data import DataError, Marketplace
from marketplace_reco.training.benchmarks import ResultJournal, markdown_table
from marketplace_reco.training.text_transformer import LEXICAL_WEIGHTS
from test_text_transformer import make_encoder

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SETUP = {"data": "export", "fractions": [0.8, 0.1, 0.1]}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_journal_keeps_each_result_and_reuses_only_comparable_ones(tmp_path: Path) -> None:
    path = tmp_path / "bench.jsonl"
    journal = ResultJournal(path, SETUP, resume=False)
    journal.add(0, "cnn", {"cnn, 1 member": {"accuracy": 0.5}, "cnn, 3 members": {"accuracy": 0.75}})
    journal.add(1, "tfidf", {"tfidf": {"accuracy": 0.25}})
    assert [(entry["seed"], entry["model"]) for entry in _lines(path)] == [
        (0, "cnn, 1 member"), (0, "cnn, 3 members"), (1, "tfidf")]

    resumed = ResultJournal(path, SETUP, resume=True)
    assert resumed.get(0, "cnn") == {"cnn, 1 member": {"accuracy": 0.5}, "cnn, 3 members": {"accuracy": 0.75}}
    assert resumed.get(1, "tfidf") == {"tfidf": {"accuracy": 0.25}} and resumed.get(2, "tfidf") is None
    # Another setup (another split, say) is not comparable: nothing of it is reused, and it adds to the journal.
    other = ResultJournal(path, {**SETUP, "fractions": [0.6, 0.2, 0.2]}, resume=True)
    assert other.get(0, "cnn") is None
    other.add(0, "cnn", {"cnn, 1 member": {"accuracy": 0.4}})
    assert len(_lines(path)) == 4
    # Without resume a journal starts afresh.
    assert ResultJournal(path, SETUP, resume=False).get(0, "cnn") is None and path.read_text() == ""


def test_a_corrupt_journal_line_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bench.jsonl"
    ResultJournal(path, SETUP, resume=False).add(0, "tfidf", {"tfidf": {"accuracy": 0.25}})
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match=rf"{path}, line 2: not a JSON result"):
        ResultJournal(path, SETUP, resume=True)


def test_markdown_table_aligns_its_columns() -> None:
    assert markdown_table(["model", "accuracy"], [["tfidf", "0.8"], ["cnn ensemble", 0.85]]).splitlines() == [
        "| model        | accuracy |",
        "| ------------ | -------- |",
        "| tfidf        | 0.8      |",
        "| cnn ensemble | 0.85     |",
    ]


def _bench_text(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPTS / "bench_text.py"), *args], capture_output=True, text=True,
                          timeout=600, check=False)


def test_bench_text_resumes_from_its_journal(sample_data: dict[str, str], tmp_path: Path) -> None:
    report, journal = tmp_path / "bench_text.md", tmp_path / "bench_text.jsonl"
    data = ["--db-url", sample_data["db_url"], "--images", sample_data["image_location"], "--output", str(report),
            "--rows", "tfidf-svm", "tfidf-svm-plain"]
    first = _bench_text(*data, "--seeds", "0")
    assert first.returncode == 0, first.stderr
    entries = _lines(journal)
    assert [(e["seed"], e["model"]) for e in entries] == [(0, "tfidf-svm"), (0, "tfidf-svm-plain")]
    # A marked result proves that --resume reads the journal instead of training again.
    entries[0]["scores"]["accuracy"] = 0.125
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries))
    second = _bench_text(*data, "--seeds", "0", "1", "--resume")
    assert second.returncode == 0, second.stderr
    assert "seed 0 tfidf-svm: accuracy 0.1250" in second.stdout and "(from the journal)" in second.stdout
    assert "seed 1 tfidf-svm: accuracy" in second.stdout and "seed 1 tfidf-svm: accuracy 0.1250" not in second.stdout
    text = report.read_text()
    assert text.startswith("# Text models on the real listings") and "`python scripts/bench_text.py " in text
    assert "2 of the 4 (seed, model) runs were taken from the journal" in text
    journal.write_text(journal.read_text() + "{not json\n")
    broken = _bench_text(*data, "--seeds", "0", "--resume")
    assert broken.returncode == 1 and "line 5: not a JSON result" in broken.stderr and "Traceback" not in broken.stderr


def test_bench_text_scores_the_transformer_with_and_without_its_lexical_head(sample_data: dict[str, str],
                                                                             sample_marketplace: Marketplace,
                                                                             tmp_path: Path) -> None:
    # As many positions as the library's default text length: the benchmark trains with the defaults.
    encoder = make_encoder(tmp_path / "encoder", sample_marketplace.products["text"], max_positions=256)
    report = tmp_path / "bench_text.md"
    run = _bench_text("--db-url", sample_data["db_url"], "--images", sample_data["image_location"], "--output",
                      str(report), "--rows", "text-transformer", "--seeds", "0", "--encoder", str(encoder),
                      "--lexical-features", "4096")
    assert run.returncode == 0, run.stderr[-3000:]
    entries = {entry["model"]: entry["scores"] for entry in _lines(report.with_suffix(".jsonl"))}
    assert set(entries) == {"text-transformer", "text-transformer, encoder alone"}
    assert entries["text-transformer"]["lexical_weight"] in LEXICAL_WEIGHTS
    text = report.read_text()
    assert "| text-transformer, encoder alone " in text and "Lexical head weight" in text
