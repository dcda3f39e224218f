"""Data changes invalidate the cache: ORM hooks that purge the right tags after a commit.

Above the shells: a hook purges through a running middleware (ASGI or WSGI), or
through a cache of its own in a process that serves no HTTP (``Purger``).
``cachemw.sqlalchemy`` and ``cachemw.django`` are the public faces.
"""

from cachemw.orm.purger import Purger

__all__ = ["Purger"]
