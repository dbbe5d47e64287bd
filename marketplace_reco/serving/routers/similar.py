"""Similar listings: ``POST /similar`` (the nearest listings of the index to a listing, photos and/or a text) and
``POST /embed`` (a listing's vector).

The index (``MARKETPLACE_INDEX``) was built by one model at one revision; queries are embedded by the served model
of that name (``MARKETPLACE_SIMILAR_MODEL`` names another, e.g. the same checkpoint served under another name), and
a served revision other than the index's is refused with 409 ``index_model_mismatch``: vectors of two revisions are
not comparable.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query

from ...search import IndexInputError, ModelMismatchError, SearchError, SearchFilters, UnknownListingError
from ...search.similar import query_vector_of_listing, similar_listings
from ..dependencies import PoolDep
from ..errors import IndexModelMismatchError, InvalidInputError, NoModelError, SearchFailedError, UnknownListingApiError
from ..inputs import PredictInputs, SimilarInputs, embed_batch_inputs, form_request_body, similar_inputs
from ..pool import ModelPool
from ..schemas import (
    EmbedBatchResponse,
    EmbedResponse,
    ErrorResponse,
    SimilarListing,
    SimilarRequest,
    SimilarResponse,
    TextBatchRequest,
)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "a photo that does not decode, or a malformed form"),
        (401, "no valid API key (only on a server configured with keys)"),
        (404, "no index or no such model on this server, or a listing id the index does not hold"),
        (409, "the served model is not the model revision that built the index"),
        (413, "too large: the body, a photo, the pixels or characters of the request, or too many inputs"),
        (415, "a body or file of the wrong media type"),
        (422, "no query, a listing id with photos or a text, k outside 1..MAX_K, bad filters"),
        (503, "the model or the index is still loading, busy, or the search failed"),
    )
}

router = APIRouter(tags=["similar"], responses=_ERRORS)

_FORM = {"type": "object", "properties": {
    "image": {"type": "array", "items": {"type": "string", "format": "binary"},
              "description": "the listing's photo, or several of its photos"},
    "text": {"type": "string", "description": "the listing's title and description"},
    **{name: {"type": "string"} for name in ("k", "category", "min_price", "max_price", "location")},
}}
_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": SimilarRequest.model_json_schema()},
    "multipart/form-data": {"schema": _FORM},
}}}

ModelQuery = Annotated[str | None, Query(min_length=1, description="embed with this served model instead")]


def _filters(query: SimilarRequest) -> SearchFilters | None:
    try:
        filters = SearchFilters(category=query.category, min_price=query.min_price, max_price=query.max_price,
                                location=query.location)
    except IndexInputError as exc:
        raise InvalidInputError(str(exc)) from None
    return filters if filters.database_filters else None


@router.post("/similar", response_model=SimilarResponse, summary="Listings similar to a listing, photos or a text",
             openapi_extra=_BODY)
async def similar(inputs: Annotated[SimilarInputs, Depends(similar_inputs)], pool: PoolDep) -> SimilarResponse:
    name = pool.similar_model()  # 404 without an index, 503 while it loads
    index = pool.index
    assert index is not None
    predictor = pool.predictor(name)
    try:
        pool.check_similar_model(predictor)
    except ModelMismatchError as exc:
        raise IndexModelMismatchError(str(exc)) from None
    query = inputs.query
    filters = _filters(query)
    try:
        if query.listing_id is not None:
            vector = await pool.run_search(partial(query_vector_of_listing, index, query.listing_id))
            excluded = frozenset([query.listing_id])
        else:
            _, vector = await pool.embed(name, inputs.images, _texts(query), batch=False)
            excluded = frozenset()
        found = await pool.run_search(partial(similar_listings, index, pool.engine, vector, query.k,
                                              exclude_ids=excluded, filters=filters))
    except UnknownListingError as exc:
        raise UnknownListingApiError(f"listing {query.listing_id!r} is not in the index {pool.index_name}: "
                                     f"{exc}") from None
    except IndexInputError as exc:
        raise InvalidInputError(str(exc)) from None
    except SearchError as exc:
        raise SearchFailedError(str(exc)) from exc
    results = [SimilarListing(listing_id=item.details.listing_id, name=item.details.name,
                              category=item.details.category, price=item.details.price, score=item.score,
                              image_ids=item.details.image_ids) for item in found]
    return SimilarResponse(model=name, revision=predictor.revision, index=pool.index_name,
                           query_listing_id=query.listing_id, results=results)


def _texts(query: SimilarRequest) -> list[str]:
    return [query.text] if query.text is not None else []


def _embedding_model(pool: ModelPool, model: str | None) -> str:
    """The model that embeds: the one asked for, or the index's."""
    if model is None and pool.index is None:
        raise NoModelError("name the model that embeds: ?model=<name> (this server has no index whose model it "
                           "could use)")
    return model or pool.similar_model()


@router.post("/embed", response_model=EmbedResponse, summary="A listing's vector from its photos and/or text",
             openapi_extra=_BODY)
async def embed(inputs: Annotated[SimilarInputs, Depends(similar_inputs)], pool: PoolDep,
                model: ModelQuery = None) -> EmbedResponse:
    if inputs.query.listing_id is not None:
        raise InvalidInputError("/embed embeds photos and/or a text; a listing's stored vector is not served")
    name = _embedding_model(pool, model)
    predictor, vectors = await pool.embed(name, inputs.images, _texts(inputs.query), batch=False)
    return EmbedResponse(model=name, revision=predictor.revision, dim=vectors.shape[1],
                         vector=vectors[0].astype(np.float64).tolist())


@router.post("/embed/batch", response_model=EmbedBatchResponse,
             summary="Vectors of several listings: the i-th photo goes with the i-th text",
             openapi_extra=form_request_body(images=True, texts=True, batch=True, either=True,
                                             json_model=TextBatchRequest))
async def embed_batch(inputs: Annotated[PredictInputs, Depends(embed_batch_inputs)], pool: PoolDep,
                      model: ModelQuery = None) -> EmbedBatchResponse:
    name = _embedding_model(pool, model)
    predictor, vectors = await pool.embed(name, inputs.images, inputs.texts, batch=True)
    return EmbedBatchResponse(model=name, revision=predictor.revision, dim=vectors.shape[1],
                              vectors=vectors.astype(np.float64).tolist())
