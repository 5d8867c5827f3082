"""/openapi.json and /docs: the generation endpoints read their body themselves (strict, and fast), so FastAPI cannot
see its model; `body_docs` declares it, and `install_openapi` adds the request models' schemas to the document."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

_REQUEST_MODELS: dict[str, type[BaseModel]] = {}


def body_docs(model: type[BaseModel], description: str, response: type[BaseModel] | None = None) -> dict[str, Any]:
    """Route keyword arguments documenting a JSON body of `model` (and the 200 answer's model)."""
    _REQUEST_MODELS[model.__name__] = model
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    ok: dict[str, Any] = {"description": description}
    if response is not None:
        ok["model"] = response
    return {"openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}},
            "responses": {200: ok}}


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (served at /openapi.json, read by /docs) include the request models' schemas."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = default()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model in _REQUEST_MODELS.items():
            doc = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
            components.update(doc.pop("$defs", {}))
            components[name] = doc
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
