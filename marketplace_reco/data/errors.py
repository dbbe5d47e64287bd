"""Errors of the data layer. Every message says what went wrong and where (file, line, URL, id).

Command-line scripts catch ``DataError`` and print its message as a one-line error.
"""

from __future__ import annotations


class DataError(Exception):
    """Base class: bad or unreachable data; the message names the source."""


class DataConfigError(DataError, ValueError):
    """An invalid parameter (split fractions, stemmer name, image size, ...); names the parameter."""


class DatabaseError(DataError):
    """A database cannot be reached, or lacks a table; names the URL (password masked) and table."""


class ImportFileError(DataError):
    """A CSV export cannot be read at all (missing file, missing columns); names the file."""


class ImageStoreError(DataError):
    """Base class for failures of an image store; names the store location."""


class InvalidImageIdError(ImageStoreError):
    """An image id that cannot be a file or object name (empty, contains ``/``, ...)."""

    def __init__(self, image_id: str, location: str) -> None:
        super().__init__(f"invalid image id {image_id!r} for image store {location}: "
                         "ids may only contain letters, digits, '.', '_' and '-'")
        self.image_id = image_id
        self.location = location


class ImageNotFoundError(ImageStoreError):
    """The store is reachable but holds no image with this id."""

    def __init__(self, image_id: str, location: str) -> None:
        super().__init__(f"image {image_id!r} not found in {location}")
        self.image_id = image_id
        self.location = location


class ImageStoreUnreachableError(ImageStoreError):
    """The store itself cannot be used: missing folder or bucket, refused connection, no credentials."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"image store {location} is unreachable: {reason}")
        self.location = location
        self.reason = reason


class CorruptImageError(DataError):
    """Bytes or a file that do not decode as an image."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"cannot decode image {source}: {reason}")
        self.source = source
        self.reason = reason


class ImageTooLargeError(DataError):
    """An image with more pixels than allowed (decompression-bomb guard)."""

    def __init__(self, source: str, pixels: int | None, max_pixels: int) -> None:
        if pixels is None:
            message = (f"image {source} is too large: PIL refused it as a possible decompression bomb "
                       f"(limit here: {max_pixels:,} pixels)")
        else:
            message = f"image {source} has {pixels:,} pixels, more than the limit of {max_pixels:,}"
        super().__init__(message)
        self.source = source
        self.pixels = pixels
        self.max_pixels = max_pixels


class MissingNLTKDataError(DataError):
    """An option needs NLTK data (e.g. WordNet for lemmatisation) that is not installed."""
