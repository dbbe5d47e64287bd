"""The embedded sample marketplace: a small synthetic copy of the users' data, generated in seconds.

``make_sample_marketplace()`` writes the users' CSV export format (unnamed index column, ``£`` prices,
dd/mm/yyyy dates, ``| in Town, County | Gumtree`` titles, stray carriage returns) and loads it with
``importer.import_csv``; photos go through an image store as ``<image id>.jpg``. So the sample takes
exactly the code paths of real data, and the models can be trained and served without the real data.

How the sample is built so that each modality is informative but imperfect and the two together are
better. The 13 real classes are grouped twice, differently:
- photos: six groups (``_IMAGE_GROUPS``); a group shares one shape and colour family. Within a group
  each class has its own texture (stripes, dots, checks, ...), but a photo shows its class's texture
  only with probability ``_CUE_PROBABILITY``; otherwise it shows the texture of a random class of the
  group. A perfect photo-only model is therefore right about 73% of the time (a pair: 0.5 + 0.5 / 2).
- texts: six other groups (``_TEXT_GROUPS``); a group shares vocabulary, and the item words come from
  the listing's own class only with probability ``_CUE_PROBABILITY`` (else from a random class of the
  group). A tenth of the listings are generic ("job lot, collection only") and say nothing, so a
  perfect text-only model is right about 67% of the time.
No two classes share both their photo group and their text group, so photo and text together single
out the class: a perfect model that combines them is right about 97% of the time.
"""

from __future__ import annotations

import colorsys
import csv
import io
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import inspect, select

from .._progress import progress_bar
from .database import mask_url, open_engine
from .errors import DataConfigError, DataError
from .image_store import open_image_store
from .images import letterbox
from .importer import import_csv
from .schema import products

#: The 13 root categories of the users' marketplace, sorted (the class order of every model).
CLASSES = (
    "Appliances",
    "Baby & Kids Stuff",
    "Clothes, Footwear & Accessories",
    "Computers & Software",
    "DIY Tools & Materials",
    "Health & Beauty",
    "Home & Garden",
    "Music, Films, Books & Games",
    "Office Furniture & Equipment",
    "Other Goods",
    "Phones, Mobile Phones & Telecoms",
    "Sports, Leisure & Travel",
    "Video Games & Consoles",
)
# Class indices grouped by what their photos share, and (differently) by what their texts share.
# Every photo group meets every text group in at most one class.
_IMAGE_GROUPS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11, 12))
_TEXT_GROUPS = ((12, 0), (1, 2, 11), (3, 4), (5, 6), (7, 8), (9, 10))
# How often a photo or a text carries its own class's cue rather than a random group member's.
_CUE_PROBABILITY = 0.5
# Share of listings whose text is generic and says nothing about the class.
_GENERIC_TEXT_PROBABILITY = 0.1

PHOTO_SIZE = 256
# (shape, hue) per photo group; shapes differ in outline (for HOG), hues in colour (for CNNs).
_GROUP_LOOKS = (("disc", 0.0), ("square", 0.6), ("triangle", 0.33), ("plus", 0.11), ("ring", 0.8), ("diamond", 0.5))
# Texture per class; classes of one photo group never share one.
_CLASS_TEXTURES = ("hstripes", "vstripes", "checker", "dots", "dstripes", "solid", "vstripes",
                   "checker", "dots", "hstripes", "solid", "dstripes", "checker")
# Photo frames before letterboxing (width, height): square, landscape and portrait shots.
_FRAMES = ((256, 256), (256, 192), (192, 256), (256, 170))

# Words shared by the classes of a text group (same order as _TEXT_GROUPS).
_GROUP_WORDS = (
    ("mains powered", "remote control", "power cable", "digital display", "boxed with manual", "energy saving"),
    ("size 10", "machine washable", "kids", "carry bag", "waterproof", "outdoor"),
    ("charger included", "battery", "carry case", "spare parts", "set of bits", "usb cable"),
    ("gift set", "bathroom", "fragrance", "mirror", "soft towels", "decor"),
    ("reading", "shelf", "study", "collection of", "desk", "paperwork"),
    ("vintage", "collectable", "boxed", "accessories", "protective cover", "gift"),
)
# Item words per class (index = class index).
_CLASS_WORDS = (
    ("fridge freezer", "washing machine", "tumble dryer", "microwave oven", "dishwasher", "kettle"),
    ("pram", "cot bed", "pushchair", "high chair", "baby monitor", "toddler toys"),
    ("dress", "leather jacket", "trainers", "jeans", "winter coat", "ankle boots"),
    ("laptop", "monitor", "keyboard", "graphics card", "printer", "ssd drive"),
    ("cordless drill", "circular saw", "timber planks", "paint", "spanner set", "screws"),
    ("hair straighteners", "makeup brushes", "perfume", "skincare", "massage gun", "body lotion"),
    ("sofa", "dining table", "curtains", "garden bench", "floor lamp", "rug"),
    ("vinyl records", "acoustic guitar", "album", "novels", "dvd box set", "digital piano"),
    ("office chair", "filing cabinet", "ergonomic desk", "stationery", "whiteboard", "shredder"),
    ("antique clock", "ornament", "souvenir", "trinket box", "figurine", "candle holder"),
    ("iphone", "samsung galaxy", "sim free handset", "android phone", "cordless landline", "smartwatch"),
    ("mountain bike", "camping tent", "golf clubs", "football", "yoga mat", "rucksack"),
    ("xbox", "playstation", "nintendo switch", "controller", "gaming headset", "console games"),
)
_ADJECTIVES = ("Lovely", "Great", "Quality", "Modern", "Large", "Small", "Brand new", "Used", "Immaculate",
               "Genuine", "Classic", "Spacious")
_FILLER = ("Excellent condition", "Collection only", "Smoke and pet free home", "Barely used",
           "Open to sensible offers", "Cash on collection", "Can deliver locally for a small fee",
           "Selling as no longer needed", "Any questions please ask", "Quick sale wanted",
           "First to see will buy", "Reluctant sale")
_GENERIC_TITLES = ("Job lot", "Bits and bobs", "House clearance items", "Various items for sale", "Bundle")
_TOWNS = (("Inverness", "Highland"), ("Radstock", "Somerset"), ("Delph", "Manchester"),
          ("Newent", "Gloucestershire"), ("Leeds", "West Yorkshire"), ("Norwich", "Norfolk"),
          ("Cardiff", "Cardiff"), ("Brighton", "East Sussex"), ("Belfast", "County Antrim"),
          ("Reading", "Berkshire"), ("York", "North Yorkshire"), ("Truro", "Cornwall"))
_FIRST_DAY = date(2022, 2, 20)


def _group_of(groups: tuple[tuple[int, ...], ...]) -> dict[int, tuple[int, tuple[int, ...]]]:
    """Class index -> (group index, group) for a grouping."""
    return {c: (g, members) for g, members in enumerate(groups) for c in members}


_IMAGE_GROUP_OF = _group_of(_IMAGE_GROUPS)
_TEXT_GROUP_OF = _group_of(_TEXT_GROUPS)


@dataclass(frozen=True)
class _Listing:
    product_id: str
    label: int
    title: str
    description: str
    price: str
    location: str
    image_ids: tuple[str, ...]


def _uuid(rng: np.random.Generator) -> str:
    """A version-4 UUID drawn from ``rng`` (deterministic for a seed, unlike uuid.uuid4)."""
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _pick(rng: np.random.Generator, options: tuple[Any, ...]) -> Any:
    return options[int(rng.integers(len(options)))]


def _cue_class(rng: np.random.Generator, label: int, group: tuple[int, ...]) -> int:
    """The class whose cue a photo or text shows: its own, or a random member of its group."""
    return label if rng.random() < _CUE_PROBABILITY else _pick(rng, group)


def _join_sentences(rng: np.random.Generator, sentences: list[str]) -> str:
    """Sentences joined like the real export: spaces, bare carriage returns or nothing at all."""
    text = sentences[0]
    for sentence in sentences[1:]:
        text += _pick(rng, (" ", " ", "\r", ""))  # "" gives run-together "condition.Collection"
        text += sentence
    return text


def _listing_text(rng: np.random.Generator, label: int) -> tuple[str, str]:
    """(title without suffix, description) of a listing of class ``label``."""
    fillers = [f"{f}." for f in rng.choice(_FILLER, size=int(rng.integers(1, 4)), replace=False)]
    if rng.random() < _GENERIC_TEXT_PROBABILITY:
        return _pick(rng, _GENERIC_TITLES), _join_sentences(rng, fillers)
    group_index, group = _TEXT_GROUP_OF[label]
    items = _CLASS_WORDS[_cue_class(rng, label, group)]
    item, other_item = rng.choice(items, size=2, replace=False)
    shared = rng.choice(_GROUP_WORDS[group_index], size=2, replace=False)
    title = f"{_pick(rng, _ADJECTIVES)} {item}"
    if rng.random() < 0.4:
        title += f" with {shared[0]}"
    sentences = [f"Selling my {item}, {shared[0]}.", f"Also have a {other_item} if interested.",
                 f"Comes {shared[1]}."]
    rest = sentences[1 : int(rng.integers(1, 4))] + fillers
    rng.shuffle(rest)
    return title, _join_sentences(rng, [sentences[0], *rest])


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32) * 255


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` of radius ``r`` in rotated, centred coordinates ``u`` (right), ``v`` (down)."""
    if shape == "disc":
        return u**2 + v**2 <= r**2
    if shape == "ring":
        d2 = u**2 + v**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if shape == "triangle":  # apex up, base at v = r/2
        return (v <= 0.5 * r) & (v >= -r + np.sqrt(3.0) * np.abs(u))
    if shape == "plus":
        arm = 0.32 * r
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    raise DataConfigError(f"unknown sample shape {shape!r}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Boolean pattern (True = first colour) in the shape's own coordinates, so it turns with the shape."""
    if texture == "hstripes":
        return np.floor(v / period) % 2 == 0
    if texture == "vstripes":
        return np.floor(u / period) % 2 == 0
    if texture == "dstripes":
        return np.floor((u + v) / (period * np.sqrt(2.0))) % 2 == 0
    if texture == "checker":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    if texture == "dots":
        du, dv = u % period - period / 2, v % period - period / 2
        return du**2 + dv**2 > (0.32 * period) ** 2
    if texture == "solid":
        return np.ones_like(u, dtype=bool)
    raise DataConfigError(f"unknown sample texture {texture!r}")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A plain, gradient or wall-and-floor backdrop in light, low-saturation colours."""
    wall = _hsv(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.75, 0.97))
    kind = rng.random()
    canvas = np.broadcast_to(wall, (height, width, 3)).copy()
    if kind < 0.3:
        ramp = np.linspace(1.0, rng.uniform(0.7, 0.9), height, dtype=np.float32)[:, None, None]
        canvas *= ramp
    elif kind < 0.5:
        floor = _hsv(rng.random(), rng.uniform(0.1, 0.4), rng.uniform(0.35, 0.6))
        canvas[int(height * rng.uniform(0.6, 0.8)):] = floor
    return canvas


def _photo(rng: np.random.Generator, label: int) -> Image.Image:
    """A product photo of class ``label``, letterboxed on black to PHOTO_SIZE like the real ones."""
    group_index, group = _IMAGE_GROUP_OF[label]
    shape, hue = _GROUP_LOOKS[group_index]
    texture = _CLASS_TEXTURES[_cue_class(rng, label, group)]
    width, height = _FRAMES[int(rng.integers(len(_FRAMES)))]
    canvas = _background(rng, height, width)

    # Broadcast row and column vectors: cheaper than full coordinate grids.
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    radius = min(width, height) * rng.uniform(0.28, 0.42)
    cx = width / 2 + rng.uniform(-0.1, 0.1) * width
    cy = height / 2 + rng.uniform(-0.1, 0.1) * height
    angle = np.deg2rad(rng.uniform(-12, 12))
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = (xx - np.float32(cx)) * cos + (yy - np.float32(cy)) * sin
    v = (yy - np.float32(cy)) * cos - (xx - np.float32(cx)) * sin
    mask = _shape_mask(shape, u, v, radius)
    main = _hsv(hue + rng.uniform(-0.04, 0.04), rng.uniform(0.6, 0.9), rng.uniform(0.65, 0.95))
    pattern = _texture(texture, u, v, period=rng.uniform(18, 26))
    canvas[mask] = np.where(pattern[mask][:, None], main, main * 0.45)
    if rng.random() < 0.2:  # a small unrelated object in a corner, as real photos have clutter
        du, dv = xx - rng.uniform(0, width * 0.2), yy - rng.uniform(0, height * 0.2)
        canvas[du**2 + dv**2 <= (min(width, height) * 0.07) ** 2] = _hsv(rng.random(), 0.5, 0.5)
    canvas += 6.0 * rng.standard_normal(canvas.shape, dtype=np.float32)  # sensor noise
    photo = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), mode="RGB")
    return letterbox(photo, PHOTO_SIZE)


def _jpeg(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _price(rng: np.random.Generator) -> str:
    """Prices as exported: ``£12.00``, ``£1,250.00``; a few are ``N/A`` like in the users' data."""
    if rng.random() < 0.03:
        return "N/A"
    return f"£{float(np.round(np.exp(rng.uniform(np.log(3), np.log(1500))))):,.2f}"


def _check_no_foreign_products(db_url: str | None, product_ids: set[str]) -> None:
    """Refuse to mix the sample into a database that holds other products (e.g. the real import)."""
    engine = open_engine(db_url, create=True)
    try:
        if not inspect(engine).has_table(products.name):
            return
        with engine.connect() as conn:
            existing = set(conn.execute(select(products.c.id)).scalars())
    finally:
        engine.dispose()
    foreign = existing - product_ids
    if foreign:
        raise DataError(
            f"database {mask_url(engine.url)} already holds {len(foreign):,} products that are not this sample "
            "(real data, or a sample of another size or seed); write the sample to another --db-url or delete it"
        )


def _write_export(folder: Path, listings: list[_Listing], image_uri: Callable[[str], str],
                  rng: np.random.Generator) -> tuple[Path, Path]:
    """``products.csv`` and ``images.csv`` in the users' export format; ``bucket_link`` is where each photo is."""
    products_csv, images_csv = folder / "products.csv", folder / "images.csv"
    with products_csv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("", "id", "product_name", "category", "product_description", "price", "location"))
        for index, item in enumerate(listings):
            writer.writerow((index, item.product_id, item.title, f"{CLASSES[item.label]} / Other", item.description,
                             item.price, item.location))
    with images_csv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("", "id", "product_id", "bucket_link", "image_ref", "create_time"))
        index = 0
        for item in listings:
            for image_id in item.image_ids:
                day = _FIRST_DAY + timedelta(days=int(rng.integers(0, 9)))
                ref = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"), 16))
                writer.writerow((index, image_id, item.product_id, image_uri(image_id), ref, day.strftime("%d/%m/%Y")))
                index += 1
    return products_csv, images_csv


def make_sample_marketplace(
    db_url: str | None = None,
    image_dir: str | Path | None = None,
    n_products: int = 390,
    seed: int = 0,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate the sample marketplace into ``db_url`` and ``image_dir`` (None: defaults from settings).

    ``image_dir`` may be any image-store location (a folder, or ``s3://bucket/prefix``). Classes are
    balanced (``n_products`` spread over the 13 classes), each product has 1-3 photos. The output is
    identical for the same ``n_products`` and ``seed``. Returns a summary (counts per class and table).
    Raises ``DataConfigError`` for fewer products than classes and ``DataError`` when the database
    already holds products that are not this sample.
    """
    if n_products < len(CLASSES):
        raise DataConfigError(f"n_products must be at least {len(CLASSES)} (one per class), not {n_products}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_products) % len(CLASSES))
    listings = []
    for label in labels:
        title, description = _listing_text(rng, int(label))
        town, county = _pick(rng, _TOWNS)
        listings.append(_Listing(
            product_id=_uuid(rng),
            label=int(label),
            title=f"{title} | in {town}, {county} | Gumtree",
            description=description,
            price=_price(rng),
            location=f"{town}, {county}",
            image_ids=tuple(_uuid(rng) for _ in range(int(rng.integers(1, 4)))),
        ))
    _check_no_foreign_products(db_url, {item.product_id for item in listings})

    store = open_image_store(image_dir, create=True)
    photos = [(image_id, int(item.label)) for item in listings for image_id in item.image_ids]
    for image_id, label in progress_bar(photos, desc="draw sample photos", unit="img", disable=not progress):
        store.put(image_id, _jpeg(_photo(rng, label)))

    with tempfile.TemporaryDirectory(prefix="marketplace-sample-") as tmp:
        products_csv, images_csv = _write_export(Path(tmp), listings, store.uri, rng)
        report = import_csv(products_csv, images_csv, db_url, progress=progress)
    if report.products.rejected or report.images.rejected:
        raise DataError(f"the generated sample was not imported cleanly:\n{report}")
    counts = np.bincount(labels, minlength=len(CLASSES))
    return {
        "database": report.database,
        "images_location": store.location,
        "seed": seed,
        "products": len(listings),
        "images": len(photos),
        "classes": {name: int(n) for name, n in zip(CLASSES, counts)},
        "import": {"products_inserted": report.products.inserted, "products_updated": report.products.updated,
                   "products_unchanged": report.products.unchanged, "images_inserted": report.images.inserted,
                   "images_updated": report.images.updated, "images_unchanged": report.images.unchanged},
    }
