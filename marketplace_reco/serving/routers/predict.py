"""Prediction endpoints: ``/image``, ``/text``, ``/combined`` and their ``/batch`` variants."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from ..dependencies import PoolDep
from ..inputs import PredictInputs, form_inputs, form_request_body, text_inputs
from ..schemas import BatchPrediction, ErrorResponse, Prediction, TextBatchRequest, TextRequest

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "an image that does not decode, or a malformed form"),
        (401, "no valid API key (only on a server configured with keys)"),
        (404, "no such model on this server"),
        (408, "the body did not arrive in time"),
        (413, "too large: the body, an image, the pixels or characters of the request in all, or too many inputs"),
        (415, "a body or file of the wrong media type"),
        (422, "a missing field, an empty or non-UTF-8 text, or inputs the model does not take"),
        (500, "the model answered with probabilities that are not finite numbers"),
        (503, ("the model is still loading, its queue is full, or the prediction ran past its deadline "
               "(with Retry-After)")),
    )
}

router = APIRouter(tags=["predict"], responses=_ERRORS)

ModelQuery = Annotated[str | None, Query(min_length=1,
                                        description="answer with this served model instead of the endpoint's own")]


@router.post("/image", response_model=Prediction, summary="Category of a listing from its photo (or photos)",
             openapi_extra=form_request_body(images=True, texts=False, batch=False))
async def predict_image(
    inputs: Annotated[PredictInputs, Depends(form_inputs("image", images=True, texts=False, batch=False))],
    pool: PoolDep, model: ModelQuery = None,
) -> Prediction:
    return (await pool.predict("image", inputs.images, inputs.texts, batch=False, model=model))[0]


@router.post("/image/batch", response_model=BatchPrediction, summary="Categories of several photos",
             openapi_extra=form_request_body(images=True, texts=False, batch=True))
async def predict_image_batch(
    inputs: Annotated[PredictInputs, Depends(form_inputs("image", images=True, texts=False, batch=True))],
    pool: PoolDep, model: ModelQuery = None,
) -> BatchPrediction:
    predictions = await pool.predict("image", inputs.images, inputs.texts, batch=True, model=model)
    return BatchPrediction(predictions=predictions)


@router.post("/text", response_model=Prediction, summary="Category of a listing from its text",
             openapi_extra=form_request_body(images=False, texts=True, batch=False, json_model=TextRequest))
async def predict_text(
    inputs: Annotated[PredictInputs, Depends(text_inputs(batch=False))], pool: PoolDep, model: ModelQuery = None,
) -> Prediction:
    return (await pool.predict("text", inputs.images, inputs.texts, batch=False, model=model))[0]


@router.post("/text/batch", response_model=BatchPrediction, summary="Categories of several texts",
             openapi_extra=form_request_body(images=False, texts=True, batch=True, json_model=TextBatchRequest))
async def predict_text_batch(
    inputs: Annotated[PredictInputs, Depends(text_inputs(batch=True))], pool: PoolDep, model: ModelQuery = None,
) -> BatchPrediction:
    predictions = await pool.predict("text", inputs.images, inputs.texts, batch=True, model=model)
    return BatchPrediction(predictions=predictions)


@router.post("/combined", response_model=Prediction,
             summary="Category of a listing from its photos and text (one of them may be missing)",
             openapi_extra=form_request_body(images=True, texts=True, batch=False, either=True))
async def predict_combined(
    inputs: Annotated[PredictInputs, Depends(form_inputs("combined", images=True, texts=True, batch=False))],
    pool: PoolDep, model: ModelQuery = None,
) -> Prediction:
    return (await pool.predict("combined", inputs.images, inputs.texts, batch=False, model=model))[0]


@router.post("/combined/batch", response_model=BatchPrediction,
             summary="Categories of several listings: the i-th photo goes with the i-th text",
             openapi_extra=form_request_body(images=True, texts=True, batch=True))
async def predict_combined_batch(
    inputs: Annotated[PredictInputs, Depends(form_inputs("combined", images=True, texts=True, batch=True))],
    pool: PoolDep, model: ModelQuery = None,
) -> BatchPrediction:
    predictions = await pool.predict("combined", inputs.images, inputs.texts, batch=True, model=model)
    return BatchPrediction(predictions=predictions)
