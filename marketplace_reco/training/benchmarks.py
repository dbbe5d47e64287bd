"""What the benchmark scripts share: the data they read, the header and tables of their reports, a result journal.

A report states when and how it was made (date, command, machine, load from other processes) so its figures
can be judged and reproduced; ``BenchmarkReport`` writes that header, and ``markdown_table`` the tables.
``ResultJournal`` keeps every finished result as a JSON line beside the report, so a long benchmark that is
stopped loses nothing and ``--resume`` runs only what is missing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.dataset import Marketplace, load_marketplace
from ..data.errors import DataError
from ..data.importer import import_csv
from ..settings import benchmark_export_dir


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Where a benchmark reads the listings: a users' CSV export folder (the real data by default) or a database."""
    group = parser.add_argument_group("data: a CSV export (imported into a temporary SQLite database) or a database")
    group.add_argument("--data", type=Path, default=benchmark_export_dir(),
                       help="export folder with products.csv, images.csv and images/ (default: %(default)s, "
                            "$MARKETPLACE_BENCHMARK_DATA)")
    group.add_argument("--db-url", default=None, help="read this database instead of importing --data")
    group.add_argument("--images", default=None,
                       help="photos with --db-url: a folder or s3://bucket/prefix (default: <--data>/images)")
    return group


def load_export(args: argparse.Namespace) -> tuple[Marketplace, str]:
    """The marketplace named by the export arguments, and how a report describes it."""
    if args.db_url is not None:
        return load_marketplace(args.db_url, args.images or str(args.data / "images")), args.db_url
    # The database only lives while it is read: the listings are in memory afterwards.
    with tempfile.TemporaryDirectory(prefix="marketplace-export-") as scratch:
        db_url = f"sqlite:///{Path(scratch) / 'marketplace.db'}"
        import_csv(args.data / "products.csv", args.data / "images.csv", db_url, progress=False)
        marketplace = load_marketplace(db_url, str(args.data / "images"))
    return marketplace, f"{args.data} (imported into a temporary SQLite database)"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table with aligned columns (cells are shown with ``str``)."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"
             for row in cells]
    lines.insert(1, "| " + " | ".join("-" * width for width in widths) + " |")
    return "\n".join(lines)


def machine_description() -> str:
    """Cores, torch threads and versions: what the seconds of a report depend on."""
    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}, torch {torch.__version__}")


class BenchmarkReport:
    """A benchmark's report: created when the benchmark starts, written with a header saying how it was made."""

    def __init__(self, title: str, path: Path, argv: Sequence[str] | None = None) -> None:
        self.title = title
        self.path = path
        script = Path(sys.argv[0]).name
        arguments = list(argv if argv is not None else sys.argv[1:])
        self.command = f"python scripts/{script} {shlex.join(arguments)}".strip()
        self._started = time.perf_counter()
        self._load_before = os.getloadavg()[0]

    def header(self) -> str:
        minutes = (time.perf_counter() - self._started) / 60
        return (f"# {self.title}\n\n"
                f"{datetime.date.today().isoformat()}, `{self.command}`, {machine_description()}; "
                f"{minutes:.0f} minutes in all. Load average {self._load_before:.1f} before and "
                f"{os.getloadavg()[0]:.1f} after: other work on the machine inflates the seconds.\n")

    def write(self, body: str) -> Path:
        """Write the header and ``body`` (markdown) to the report file; returns its path."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{self.header()}\n{body.rstrip()}\n", encoding="utf-8")
        print(f"report: {self.path}")
        return self.path


class ResultJournal:
    """Results as JSON lines, one per (seed, row, model), appended as soon as they are known.

    A result is reused only for the same ``setup`` (data source, fractions, whatever makes results comparable),
    so a journal never mixes runs that are not comparable. Without ``resume`` the journal starts afresh.
    """

    def __init__(self, path: Path, setup: dict[str, Any], resume: bool) -> None:
        self.path = path
        self.setup = setup
        #: (seed, row) -> the scores of each model that row produced.
        self.results: dict[tuple[int, str], dict[str, dict[str, float]]] = {}
        if resume and path.exists():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {number}: not a JSON result ({exc}); remove the line") from exc
                if entry.get("setup") == setup:
                    self.results.setdefault((entry["seed"], entry["row"]), {})[entry["model"]] = entry["scores"]
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("", encoding="utf-8")

    def get(self, seed: int, row: str) -> dict[str, dict[str, float]] | None:
        """The journal's scores of ``row`` on ``seed`` by model name, or None when they are not there."""
        return self.results.get((seed, row))

    def add(self, seed: int, row: str, scored: dict[str, dict[str, float]]) -> None:
        """Append one row's results (several models) in a single write: a run stopped here leaves all or none."""
        lines = "".join(json.dumps({"seed": seed, "row": row, "model": model, "scores": scores, "setup": self.setup})
                        + "\n" for model, scores in scored.items())
        with self.path.open("a", encoding="utf-8") as journal:
            journal.write(lines)
