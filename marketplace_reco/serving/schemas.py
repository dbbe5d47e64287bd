"""Request and response bodies of the HTTP API (and the ``Prediction`` the Python predictor returns)."""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel, Field

from ..search import MAX_K


class Prediction(BaseModel):
    """One answer: the most probable class, every class ranked, and the model that answered."""

    pred: str = Field(description="the most probable class")
    classes: list[str] = Field(description="every class, most probable first")
    probabilities: dict[str, float] = Field(description="class -> probability, most probable first")
    model: str = Field(description="name of the model that answered")
    revision: str = Field(description="revision of that model's checkpoint")
    known_tokens: int | None = Field(
        None, description="words of the text the model knows (text models only); 0 means the text told it nothing"
    )
    warning: str | None = Field(None, description="set when the answer rests on less than the inputs suggest")


class BatchPrediction(BaseModel):
    """One prediction per input, in the order the inputs were sent."""

    predictions: list[Prediction]


class TextRequest(BaseModel):
    """JSON body of ``POST /text``; the original service's clients send ``txt``."""

    text: str = Field(validation_alias=AliasChoices("text", "txt"), description="the listing's title and description")


class TextBatchRequest(BaseModel):
    """JSON body of ``POST /text/batch``."""

    texts: list[str] = Field(min_length=1, validation_alias=AliasChoices("texts", "txts"))


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. 'bad_image', 'unknown_model'")
    message: str = Field(description="what was wrong, for a person")
    details: list[dict[str, Any]] | None = Field(None, description="per-field problems of a 422")


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class ModelInfo(BaseModel):
    """What a served model is and how well it did."""

    name: str
    revision: str
    model_type: str
    input_kind: str
    endpoints: list[str] = Field(description="the prediction endpoints this model answers by default")
    classes: list[str]
    preprocessing: dict[str, Any]
    metrics: dict[str, Any]
    quantization: str | None = Field(description="'int8' when the server runs some of the model's linear layers "
                                                 "quantized (MARKETPLACE_QUANTIZATION), null for its float weights")


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    models: dict[str, str] = Field(description="model name -> 'loading', 'ready' or 'failed: <reason>'")


class SimilarRequest(BaseModel):
    """The query of ``POST /similar`` (a JSON body, or the same names as form fields beside the photos): a listing of
    the index by id, or a text (with photos, in a form), ``k`` and optional filters."""

    listing_id: str | None = Field(None, min_length=1, description="a listing of the index: its neighbours, "
                                                                     "never itself")
    text: str | None = Field(None, min_length=1, validation_alias=AliasChoices("text", "txt"),
                             description="a listing's title and description")
    k: int = Field(10, ge=1, le=MAX_K, description=f"how many listings to answer (1 to {MAX_K})")
    category: str | None = Field(None, min_length=1, description="category path prefix, e.g. 'Home & Garden'")
    min_price: float | None = Field(None, ge=0, description="lowest price in pounds (inclusive)")
    max_price: float | None = Field(None, ge=0, description="highest price in pounds (inclusive)")
    location: str | None = Field(None, min_length=1, description="a substring of the listing's location, any case")


class SimilarListing(BaseModel):
    """One similar listing."""

    listing_id: str
    name: str
    category: str | None
    price: float | None = Field(description="pounds; null when the listing has no price")
    score: float = Field(description="cosine similarity to the query, in [-1, 1]; higher is more similar")
    image_ids: list[str] = Field(description="the listing's photo ids")


class SimilarResponse(BaseModel):
    """The most similar listings, best first, each once, never the query's own listing."""

    model: str = Field(description="the model that embedded the query (and built the index)")
    revision: str
    index: str = Field(description="the listing index searched")
    query_listing_id: str | None = None
    results: list[SimilarListing]


class EmbedResponse(BaseModel):
    """A listing's vector: unit length, comparable by inner product with the vectors of an index of the same model."""

    model: str
    revision: str
    dim: int
    vector: list[float]


class EmbedBatchResponse(BaseModel):
    """Several listings' vectors, in the order the listings were sent; each as ``EmbedResponse.vector``."""

    model: str
    revision: str
    dim: int
    vectors: list[list[float]]
