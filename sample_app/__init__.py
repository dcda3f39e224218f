"""cachemw's sample app: ``python -m sample_app`` or ``uvicorn sample_app:app``."""

from sample_app.app import app, create_app

__all__ = ["app", "create_app"]
