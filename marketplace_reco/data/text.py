"""Listing text: cleaning the raw name and description, and tokenising with a serialisable configuration.

``clean_listing_text`` turns the exported strings into readable text; ``TextPreprocessor`` turns text into
tokens. The preprocessor's whole configuration, stop-word list included, is plain data (``to_config``)
so that it travels inside model checkpoints and a loaded model tokenises exactly as it was trained.
Only NLTK parts that need no downloaded data are used (regular-expression tokenising, Porter and
Snowball stemmers); WordNet lemmatisation is optional and says how to install its data when missing.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache, cached_property, lru_cache
from importlib import resources
from typing import Any, Literal

from .errors import DataConfigError, MissingNLTKDataError

# "Name | in Town, County | Gumtree" (the county is sometimes absent) or a bare "Name | Gumtree".
_MARKETPLACE_SUFFIX = re.compile(r"\s*(?:\|\s*in\s+[^|]*)?\|\s*gumtree\s*$", re.IGNORECASE)
# "cookingServes": a lower-case word run into a capitalised one where a line break was lost. At least
# two lower-case letters before, so brand names such as iPhone, eBay or McDonald stay whole.
_RUN_TOGETHER = re.compile(r"(?<=[a-z]{2})(?=[A-Z][a-z])")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u2032": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"'})
# Unicode categories replaced by a space: symbols (emoji, ™, bullets), controls, format characters
# (zero-width joiners, direction marks), private use, unassigned, enclosing marks (keycaps).
_DROPPED_CATEGORIES = {"So", "Sk", "Cc", "Cf", "Co", "Cn", "Cs", "Me"}
_VARIATION_SELECTORS = re.compile("[\ufe00-\ufe0f]")
_WHITESPACE = re.compile(r"\s+")

DEFAULT_TOKEN_PATTERN = r"[^\W_]+(?:'[^\W_]+)*"
_WORD_CACHE_SIZE = 200_000
Stemmer = Literal["snowball", "porter"]


def _cp1252_fallback(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: decode the offending bytes as Windows-1252 (undefined ones as spaces)."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    bad = exc.object[exc.start: exc.end]
    return bad.decode("cp1252", errors="replace").replace("\ufffd", " "), exc.end


_CP1252_FALLBACK = "marketplace_reco.cp1252"
codecs.register_error(_CP1252_FALLBACK, _cp1252_fallback)


def decode_bytes(data: bytes) -> str:
    """UTF-8 bytes to text, reading any invalid sequence as Windows-1252 instead of failing.

    Exports that are not valid UTF-8 are nearly always Windows-1252 (``caf\\xe9`` -> ``café``), and
    decoding only the invalid sequences that way keeps the valid UTF-8 around them intact.
    """
    return data.decode("utf-8", errors=_CP1252_FALLBACK)


def _as_text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return decode_bytes(value) if isinstance(value, bytes) else value


def _normalise(text: str) -> str:
    """NFKC, ASCII quotes, emoji and invisible characters out, lost line breaks restored, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    text = _VARIATION_SELECTORS.sub("", text)
    text = "".join(" " if unicodedata.category(ch) in _DROPPED_CATEGORIES else ch for ch in text)
    text = _RUN_TOGETHER.sub(" ", text)
    return _WHITESPACE.sub(" ", text).strip()


def strip_marketplace_suffix(name: str) -> str:
    """``"Sofa | in Delph, Manchester | Gumtree"`` -> ``"Sofa"``."""
    return _MARKETPLACE_SUFFIX.sub("", name)


def clean_listing_text(name: str | bytes | None, description: str | bytes | None) -> str:
    """One clean string from a listing's name and description (either may be empty, None or bytes).

    The marketplace suffix is removed from the name; carriage returns, emoji, symbols and invisible
    characters become spaces; Unicode is NFKC-normalised with curly quotes made ASCII; a lower-case
    word run into a capitalised one (``cookingServes``) is split. Returns ``""`` when nothing is left.
    """
    parts = (_normalise(strip_marketplace_suffix(_as_text(name))), _normalise(_as_text(description)))
    return " ".join(part for part in parts if part)


@cache
def english_stop_words() -> tuple[str, ...]:
    """NLTK's English stop-word list (179 words), shipped with the package so no download is needed."""
    text = resources.files(__package__).joinpath("stopwords_en.txt").read_text(encoding="utf-8")
    return tuple(word for word in (line.strip() for line in text.splitlines()) if word)


def _require_wordnet() -> None:
    """Raise a clear error, at configuration time, when WordNet data is not installed."""
    import nltk  # lazily, like below: importing nltk costs seconds (it pulls in scipy)

    try:
        nltk.data.find("corpora/wordnet")  # also finds corpora/wordnet.zip
    except LookupError as exc:
        raise MissingNLTKDataError(
            "lemmatize=True needs NLTK's WordNet data, which is not installed: run "
            "`python -m nltk.downloader wordnet omw-1.4`, or set NLTK_DATA to a folder holding "
            f"corpora/wordnet (searched: {', '.join(nltk.data.path)})"
        ) from exc


@dataclass(frozen=True)
class TextPreprocessor:
    """Tokeniser configuration: text -> list of tokens. All fields are JSON-serialisable.

    Tokens are ``token_pattern`` matches (after lower-casing when ``lowercase``), without stop words
    (compared lower-cased) and tokens shorter than ``min_token_length``, then lemmatised (WordNet) when
    ``lemmatize`` and stemmed when ``stemmer`` is set.
    """

    lowercase: bool = True
    stop_words: list[str] = field(default_factory=lambda: list(english_stop_words()))
    stemmer: Stemmer | None = "snowball"
    lemmatize: bool = False
    min_token_length: int = 2
    token_pattern: str = DEFAULT_TOKEN_PATTERN

    def __post_init__(self) -> None:
        if self.stemmer not in ("snowball", "porter", None):
            raise DataConfigError(
                f"TextPreprocessor.stemmer must be 'snowball', 'porter' or None, not {self.stemmer!r}")
        if self.min_token_length < 1:
            raise DataConfigError(f"TextPreprocessor.min_token_length must be at least 1, not {self.min_token_length}")
        try:
            re.compile(self.token_pattern)
        except re.error as exc:
            raise DataConfigError(
                f"TextPreprocessor.token_pattern {self.token_pattern!r} is not a regex: {exc}") from exc
        if self.lemmatize:
            _require_wordnet()

    @cached_property
    def _token_regex(self) -> re.Pattern[str]:
        return re.compile(self.token_pattern)

    @cached_property
    def _stop_set(self) -> frozenset[str]:
        return frozenset(word.lower() for word in self.stop_words)

    @cached_property
    def _stem(self) -> Callable[[str], str] | None:
        if self.stemmer is None:
            return None
        from nltk.stem import PorterStemmer, SnowballStemmer

        stem = SnowballStemmer("english").stem if self.stemmer == "snowball" else PorterStemmer().stem
        # Listings repeat a small vocabulary; memoising makes stemming several times faster.
        return lru_cache(maxsize=_WORD_CACHE_SIZE)(stem)

    @cached_property
    def _lemmatize(self) -> Callable[[str], str] | None:
        if not self.lemmatize:
            return None
        from nltk.stem import WordNetLemmatizer

        return lru_cache(maxsize=_WORD_CACHE_SIZE)(WordNetLemmatizer().lemmatize)

    def tokenize(self, text: str) -> list[str]:
        """Tokens of ``text`` (pass it through ``clean_listing_text`` first for raw listings)."""
        if self.lowercase:
            text = text.lower()
        tokens = [token for token in self._token_regex.findall(text)
                  if len(token) >= self.min_token_length and token.lower() not in self._stop_set]
        if self._lemmatize is not None:
            tokens = [self._lemmatize(token) for token in tokens]
        if self._stem is not None:
            tokens = [self._stem(token) for token in tokens]
        return tokens

    def to_config(self) -> dict[str, Any]:
        """The configuration as a JSON-serialisable dict (stop words included)."""
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TextPreprocessor:
        """Rebuild from ``to_config()``; unknown keys are an error naming them."""
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise DataConfigError(f"unknown TextPreprocessor config key(s): {', '.join(unknown)}")
        return cls(**config)
