"""The FastAPI variant of the product route, mounted at ``/api``.

It shows that ``@cache`` goes below FastAPI's route decorator without hiding the
handler's signature: ``product_id: int`` is still validated (``/api/products/abc``
answers 422), and the tag template uses FastAPI's parameter name.
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

from cachemw import cache
from sample_app.db import database

__all__ = ["Product", "fastapi_app"]

fastapi_app = FastAPI(
    title="cachemw sample API",
    summary="The product route of the sample app, written for FastAPI and cached by cachemw.",
)


class Product(BaseModel):
    id: int
    name: str
    price: float
    generated_at: str


@fastapi_app.get("/products/{product_id}")
@cache(ttl="5m", tags=["product:{product_id}"])
async def api_product(product_id: int, request: Request) -> Product:
    """One product; cached for five minutes under the same tag as ``/products/{id}``."""
    row = await database(request).product(product_id)
    if row is None:
        raise HTTPException(status_code=404, detail=f"no product {product_id}")
    return Product(**row)
