"""vLLM's utility endpoints: /tokenize, /detokenize and /version (the router has the model's tokenizer)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import pydantic
from fastapi import APIRouter, Request

from engine.tokenizer import Tokenizer
from router.errors import APIError, bad_request, from_validation_error
from router.openapi import body_docs
from router.params import checked_ids
from router.protocol import DetokenizeRequest, ModelCard, TokenizeRequest


def version() -> str:
    try:
        return importlib.metadata.version("disagg")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


async def _parse(request: Request, model: type[pydantic.BaseModel]) -> Any:
    try:
        return model.model_validate_json(await request.body())
    except pydantic.ValidationError as e:
        raise from_validation_error(e) from None


def _check_model(model: str | None, served: str) -> None:
    if model is not None and model != served:
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def _tokenize(tokenizer: Tokenizer, req: TokenizeRequest) -> list[int]:
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give either prompt or messages", param="prompt")
    if req.prompt is not None:
        return tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    try:
        text = tokenizer.apply_chat_template([m.for_template() for m in req.messages or []],
                                             add_generation_prompt=req.add_generation_prompt is not False)
    except ValueError as e:
        raise bad_request(str(e), param="messages") from None
    return tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))


def utility_routes(tokenizer: Tokenizer, model_card: Callable[[], ModelCard], served: str) -> APIRouter:
    api = APIRouter(tags=["utility"])

    @api.post("/tokenize", **body_docs(TokenizeRequest, "count, max_model_len, tokens (and token_strs)"))
    async def tokenize(request: Request) -> dict[str, Any]:
        req: TokenizeRequest = await _parse(request, TokenizeRequest)
        _check_model(req.model, served)
        ids = _tokenize(tokenizer, req)
        strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": model_card().max_model_len, "tokens": ids, "token_strs": strs}

    @api.post("/detokenize", **body_docs(DetokenizeRequest, "the text of the tokens, as prompt"))
    async def detokenize(request: Request) -> dict[str, str]:
        req: DetokenizeRequest = await _parse(request, DetokenizeRequest)
        _check_model(req.model, served)
        return {"prompt": tokenizer.decode(checked_ids(tokenizer, req.tokens, "tokens"))}

    @api.get("/version")
    async def get_version() -> dict[str, str]:
        return {"version": version()}

    return api
