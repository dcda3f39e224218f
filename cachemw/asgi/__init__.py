"""The ASGI shell: CacheMiddleware (configuration only), responders, the route table from Starlette/FastAPI routes."""
