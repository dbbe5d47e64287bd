"""The serving benchmarks' own logic, on the sample marketplace (the benchmarks themselves run for minutes)."""

from __future__ import annotations

import argparse
import runpy
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from marketplace_reco.data.dataset import load_marketplace

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str) -> dict[str, Any]:
    """The globals of ``scripts/<name>.py``, run as a module (its dataclasses need one in sys.modules)."""
    return runpy.run_path(str(SCRIPTS / f"{name}.py"), run_name=f"scripts_{name}")


def test_bench_serving_sends_only_listings_that_have_a_photo(sample_data: dict[str, str], tmp_path: Path) -> None:
    """Issue 19: on real data, the first listing without a photo stopped it with an IndexError."""
    database = tmp_path / "marketplace.db"
    shutil.copy(sample_data["db_url"].removeprefix("sqlite:///"), database)
    db_url = f"sqlite:///{database}"
    first = load_marketplace(db_url, sample_data["image_location"]).products["product_id"][0]
    with sqlite3.connect(database) as connection:
        connection.execute("DELETE FROM images WHERE product_id = ?", (first,))
    args = argparse.Namespace(db_url=db_url, images=sample_data["image_location"], listings=3)
    listings = _script("bench_serving")["_listings"](args)
    products = load_marketplace(db_url, sample_data["image_location"]).products
    assert products["image_ids"][0] == []  # the first listing has no photo now
    assert len(listings) == 3 and all(listing.photo and listing.text for listing in listings)
    assert [listing.text for listing in listings] == list(products["text"][1:4])
