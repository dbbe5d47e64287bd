"""Cleaning edge cases: listing text and tokenising, photo decoding and letterboxing."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from marketplace_reco.data.errors import (
    CorruptImageError,
    DataConfigError,
    ImageNotFoundError,
    ImageTooLargeError,
    MissingNLTKDataError,
)
from marketplace_reco.data.images import letterbox, load_image
from marketplace_reco.data.text import TextPreprocessor, clean_listing_text, english_stop_words

# --- text -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("Stainless Steel Food Steamer | in Inverness, Highland | Gumtree", "Stainless Steel Food Steamer"),
    ("Oasis American Supernova CD | in Aberdeen | Gumtree", "Oasis American Supernova CD"),
    ("PLUSH VELVET || VERONA CORNER SOFA | in Delph, Manchester | Gumtree", "PLUSH VELVET || VERONA CORNER SOFA"),
    ("Sofa | Gumtree", "Sofa"),
    ("Sofa | in Leeds, West Yorkshire | gumtree  ", "Sofa"),
])
def test_marketplace_suffix_is_removed(name: str, expected: str) -> None:
    assert clean_listing_text(name, "") == expected


@pytest.mark.parametrize("description", ["", "   ", " \r\n\t ", None])
def test_empty_or_blank_description_leaves_the_name(description: str | None) -> None:
    assert clean_listing_text("Oak table | in Leeds | Gumtree", description) == "Oak table"


def test_nothing_left_is_empty_text() -> None:
    assert clean_listing_text(" | in Leeds | Gumtree", "\r 👉✅ \u200b") == ""
    assert clean_listing_text(None, None) == ""


def test_real_world_dirt_is_cleaned() -> None:
    text = clean_listing_text(
        "Shannon Sofa | in Delph, Manchester | Gumtree",
        "New Design\rShannon Corner sofa\u00a05 Seater Available👉Factory Price\u200e ✅️ family cookingServes 4 "
        "Morphy Richard’s iPhone eBay 1️⃣",
    )
    assert text == ("Shannon Sofa New Design Shannon Corner sofa 5 Seater Available Factory Price family cooking "
                    "Serves 4 Morphy Richard's iPhone eBay 1")


def test_non_utf8_bytes_are_decoded() -> None:
    # Windows-1252 bytes amid valid UTF-8: the invalid ones are read as cp1252, the rest stays intact.
    raw = "Crème brûlée dish ".encode() + b"caf\xe9 \x81\xff"
    assert clean_listing_text(b"Dish | in Leeds | Gumtree", raw) == "Dish Crème brûlée dish café ÿ"


def test_clean_text_on_real_listings(shared_marketplace: Path) -> None:
    products = pd.read_csv(shared_marketplace / "products.csv", lineterminator="\n", dtype=str,
                           keep_default_na=False, nrows=300)
    texts = [clean_listing_text(n, d) for n, d in zip(products["product_name"], products["product_description"])]
    assert all(texts)
    assert not any("Gumtree" in t[-10:] or "\r" in t or "  " in t for t in texts)
    assert not any(ord(ch) >= 0x1F000 for t in texts for ch in t)


def test_stop_words_ship_with_the_package() -> None:
    words = english_stop_words()
    assert len(words) == 179 == len(set(words))
    assert {"the", "and", "don't", "wouldn't", "i"} <= set(words)


def test_tokenize_options() -> None:
    text = "The Running shoes don't FIT, 2 pairs: runner's size-10"
    assert TextPreprocessor().tokenize(text) == ["run", "shoe", "fit", "pair", "runner", "size", "10"]
    assert TextPreprocessor(stemmer="porter").tokenize("Cooking cookies") == ["cook", "cooki"]
    assert TextPreprocessor(stemmer=None, stop_words=[]).tokenize("The shoes") == ["the", "shoes"]
    assert TextPreprocessor(stemmer=None, lowercase=False).tokenize("The Shoes FIT") == ["Shoes", "FIT"]
    assert TextPreprocessor(stemmer=None, min_token_length=3).tokenize("a tv on desk") == ["desk"]
    assert TextPreprocessor(stemmer=None, token_pattern=r"\d+").tokenize("size 10 and 12") == ["10", "12"]


def test_config_round_trips_through_json() -> None:
    original = TextPreprocessor(stop_words=["sofa", "chair"], stemmer="porter", min_token_length=1)
    restored = TextPreprocessor.from_config(json.loads(json.dumps(original.to_config())))
    assert restored == original
    assert restored.tokenize("A sofa and a chair, used") == original.tokenize("A sofa and a chair, used") == [
        "a", "and", "a", "use"]


@pytest.mark.parametrize(("config", "match"), [
    ({"stemmer": "lancaster"}, "stemmer must be 'snowball', 'porter' or None"),
    ({"min_token_length": 0}, "min_token_length must be at least 1"),
    ({"token_pattern": "("}, "token_pattern '\\(' is not a regex"),
    ({"colour": "red"}, "unknown TextPreprocessor config key"),
])
def test_bad_config_is_a_clear_error(config: dict[str, object], match: str) -> None:
    with pytest.raises(DataConfigError, match=match):
        TextPreprocessor.from_config(config)


def test_lemmatize_without_wordnet_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(MissingNLTKDataError, match=r"nltk\.downloader wordnet"):
        TextPreprocessor(lemmatize=True)


# --- photos ---------------------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(pixels)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels but holds one compressed byte: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_corrupt_jpeg_is_a_clear_error() -> None:
    jpeg = _encode(_halves(64, 64), "JPEG")
    with pytest.raises(CorruptImageError, match=r"(?i)cannot decode image photo-7: .*truncated"):
        load_image(jpeg[: len(jpeg) // 2], name="photo-7")
    with pytest.raises(CorruptImageError, match=r"cannot decode image <9 bytes>: not a recognised image format \(JPEG"):
        load_image(b"not a jpg")


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFoundError, match=f"image 'gone.jpg' not found in {tmp_path}"):
        load_image(tmp_path / "gone.jpg")


def test_png_with_alpha_is_composited_on_white() -> None:
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[:, :10] = (200, 10, 10, 255)  # opaque red left half, fully transparent right half
    rgba[:, 10:] = (0, 0, 0, 0)
    img = load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert img.mode == "RGB"
    assert img.getpixel((2, 5)) == (200, 10, 10) and img.getpixel((15, 5)) == (255, 255, 255)


def test_palette_transparency_grey_and_cmyk_become_rgb() -> None:
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    decoded = load_image(_encode(palette, "PNG", transparency=0))
    assert decoded.getpixel((0, 0)) == (0, 255, 0) and decoded.getpixel((3, 3)) == (255, 255, 255)
    assert load_image(Image.new("LA", (3, 3), (100, 0))).getpixel((1, 1)) == (255, 255, 255)
    assert load_image(_encode(Image.new("L", (3, 3), 77), "PNG")).getpixel((1, 1)) == (77, 77, 77)
    cmyk = load_image(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((4, 4))[0] > 200 > cmyk.getpixel((4, 4))[1]


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    deep = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    img = load_image(_encode(deep, "PNG"))
    assert [img.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_rotated_photo_is_made_upright() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display needs a 90 degree clockwise turn
    img = load_image(_encode(_halves(40, 20), "JPEG", exif=exif.tobytes(), quality=95))
    assert img.size == (20, 40)
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the red left half is now on top


def test_very_large_images_are_refused_before_decoding() -> None:
    with pytest.raises(ImageTooLargeError, match=r"image bomb\.png has 100,000,000 pixels, more than the limit"):
        load_image(_png_header_only(10_000, 10_000), name="bomb.png")
    # Beyond even PIL's own guard, which fires while reading the header.
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png is too large: PIL refused it as a possible decompression"):
        load_image(_png_header_only(100_000, 100_000), max_pixels=10**11, name="bomb.png")


def test_large_photo_loads_under_the_limit_and_letterboxes() -> None:
    big = _encode(_halves(4000, 3000), "JPEG", quality=80)
    with pytest.raises(ImageTooLargeError, match="12,000,000 pixels, more than the limit of 1,000,000"):
        load_image(big, max_pixels=1_000_000)
    boxed = letterbox(load_image(big), 256)
    assert boxed.size == (256, 256)
    assert boxed.getpixel((128, 5)) == (0, 0, 0)  # padding above the 256x192 photo
    assert boxed.getpixel((5, 128))[0] > 200 and boxed.getpixel((250, 128))[2] > 200


def test_one_pixel_image_and_thin_strips() -> None:
    dot = load_image(_encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"))
    boxed = letterbox(dot, 32)
    assert boxed.size == (32, 32) and boxed.getpixel((0, 0)) == boxed.getpixel((31, 31)) == (10, 200, 30)
    strip = letterbox(Image.new("RGB", (1000, 1), (255, 255, 255)), 64)
    assert strip.size == (64, 64)
    assert sum(strip.getpixel((32, y)) == (255, 255, 255) for y in range(64)) == 1


def test_letterbox_keeps_aspect_and_pads_with_fill() -> None:
    boxed = letterbox(Image.new("RGB", (200, 100), (255, 255, 255)), 100, fill=(9, 9, 9))
    column = [boxed.getpixel((50, y)) for y in range(100)]
    assert column[:25] == column[75:] == [(9, 9, 9)] * 25
    assert column[25:75] == [(255, 255, 255)] * 50
    with pytest.raises(DataConfigError, match="letterbox size"):
        letterbox(boxed, 0)


def test_load_image_accepts_paths_and_images_and_returns_a_copy(tmp_path: Path) -> None:
    original = _halves(8, 8)
    original.save(tmp_path / "a.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "a.png")), np.asarray(original))
    loaded = load_image(original)
    assert loaded is not original and np.array_equal(np.asarray(loaded), np.asarray(original))
