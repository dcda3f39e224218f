"""The store a Settings value names, built as startup builds it."""

from __future__ import annotations

from cachemw.core.policy import ConfigError
from cachemw.core.settings import Settings, check_redis_url, masked_url
from cachemw.store import store_from_url
from cachemw.store.base import Store

__all__ = ["open_store"]


def open_store(settings: Settings, *, timeout: float | None = None) -> Store:
    """The store ``settings`` name, as startup makes it: validated, nothing connected yet.

    A URL the store cannot use (``redis://host:6391:0``) is a ConfigError naming the
    settings' file, the field and the URL (password masked). ``timeout`` defaults to
    ``store_timeout``. ``cachemw check`` runs exactly this.
    """
    try:
        if settings.redis_url is not None:
            check_redis_url(settings.redis_url)
        return store_from_url(settings.redis_url, timeout=settings.store_timeout if timeout is None else timeout,
                              memory_max_bytes=settings.memory_max_bytes, prefix=settings.key_prefix,
                              background_timeout=settings.background_timeout, grace=settings.store_grace,
                              tracking=settings.tracking)
    except ValueError as exc:
        url = f" {masked_url(settings.redis_url)!r}" if settings.redis_url else ""
        raise ConfigError(f"{settings.source or 'settings'}: field 'redis_url'{url}: {exc}") from None
