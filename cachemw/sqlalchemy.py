"""cachemw for SQLAlchemy 2.x: data changes invalidate the cache, whichever process commits them.

::

    from cachemw.sqlalchemy import invalidate_on_commit

    invalidate_on_commit(SessionLocal, tags={Product: ["product:{id}"],
                                             Order: ["stats", "order:{id}", "customer:{customer_id}"]},
                         cache=middleware)

After each commit the tags of the rows it inserted, updated (old and new values)
and deleted are purged once; a rollback purges nothing. Bulk statements purge the
table's coarse tags (``table:NAME`` and the templates naming no column). See
``cachemw.orm.sqlalchemy``.
"""

from cachemw.orm.purger import Purger
from cachemw.orm.sqlalchemy import CommitHook, invalidate_on_commit

__all__ = ["CommitHook", "Purger", "invalidate_on_commit"]
