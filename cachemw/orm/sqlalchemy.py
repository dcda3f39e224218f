"""SQLAlchemy 2.x: after a transaction commits, purge the tags of every row it inserted, updated or deleted.

Sync and asyncio sessions alike. Each flush adds the tags of the rows it wrote to
the transaction's pending set: an inserted row's (its new primary key included),
an updated row's old and new values (a moved foreign key purges both sides), a
deleted row's. A bulk ``update()``/``delete()``/``insert()`` run through the
session adds its table's coarse tags (``table:NAME`` and the templates naming no
column), since its rows are unknown. The commit purges the set once, in one
batch; a rollback drops it. A rolled-back savepoint's rows are still purged when
the transaction commits: more than needed, never less.

Not seen: statements run on a connection outside a session, and ``text()`` SQL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Engine, Table, event, inspect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, UOWTransaction, sessionmaker
from sqlalchemy.orm.session import SessionTransaction
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet

from cachemw.core.policy import ConfigError
from cachemw.core.tags import TableTags
from cachemw.orm.purger import Purger
from cachemw.runtime.shell import CacheShell

__all__ = ["CommitHook", "invalidate_on_commit"]

logger = logging.getLogger("cachemw.orm")

DECLARED = "__cachemw_tags__"
"""The declarative form: ``__cachemw_tags__ = ["product:{id}"]`` on a mapped class."""

Declared = Mapping[Any, Sequence[str]]
"""Mapped classes (or ``Table`` objects) to their tag templates."""


class _Tables:
    """The tags of each mapped class and table: declared to the hook, or on the class."""

    def __init__(self, declared: Declared) -> None:
        self.classes: dict[type, TableTags | None] = {}
        self.tables: dict[str, TableTags] = {}
        self._explicit: dict[type, TableTags] = {}
        for key, templates in declared.items():
            if isinstance(key, Table):
                tags = TableTags.for_table(f"tags for table {key.name}", key.name, templates, key.c.keys())
                self.tables[key.name] = tags
                continue
            mapper = _mapper(key)
            if mapper is None:
                raise ConfigError(f"invalidate_on_commit: tags: {key!r} is neither a mapped class nor a Table")
            tags = _class_tags(mapper, templates)
            self._explicit[mapper.class_] = tags
            self.tables.setdefault(tags.table, tags)

    def of_class(self, cls: type) -> TableTags | None:
        if cls in self.classes:
            return self.classes[cls]
        found: TableTags | None = None
        explicit = next((self._explicit[klass] for klass in cls.__mro__ if klass in self._explicit), None)
        templates = getattr(cls, DECLARED, None)
        if explicit is not None:
            found = explicit
        elif templates is not None:
            mapper = _mapper(cls)
            try:
                if mapper is None:
                    raise ConfigError(f"{cls.__qualname__}.{DECLARED}: the class is not mapped")
                found = _class_tags(mapper, templates)
            except ConfigError as exc:  # found during a flush: said, never raised into the commit
                logger.error("cachemw: %s; its rows purge nothing", exc)
        self.classes[cls] = found
        if found is not None:
            self.tables.setdefault(found.table, found)
        return found

    def of_statement(self, state: ORMExecuteState) -> TableTags | None:
        mapper = state.bind_mapper
        if mapper is not None:
            found = self.of_class(mapper.class_)
            if found is not None:
                return found
        table = getattr(state.statement, "table", None)
        return self.tables.get(table.name) if isinstance(table, Table) else None


def _mapper(cls: Any) -> Mapper[Any] | None:
    found = inspect(cls, raiseerr=False)
    return found if isinstance(found, Mapper) else None


def _class_tags(mapper: Mapper[Any], templates: Sequence[str]) -> TableTags:
    table = mapper.local_table
    name = table.name if isinstance(table, Table) else mapper.class_.__name__
    tags = TableTags.for_table(f"tags for {mapper.class_.__qualname__}", name, templates,
                               [prop.key for prop in mapper.column_attrs])
    for field in tags.fields:  # a moved foreign key set on an expired row must still purge its old side
        attribute = getattr(mapper.class_, field)
        if not event.contains(attribute, "set", _keep_old_value):
            event.listen(attribute, "set", _keep_old_value, active_history=True, propagate=True)
    return tags


def _values(state: InstanceState[Any], fields: Iterable[str], *, old: bool) -> dict[str, object]:
    """A row's values of ``fields`` from the attributes' history: as committed (``old``) or as written."""
    values: dict[str, object] = {}
    for field in fields:
        added, unchanged, deleted = state.attrs[field].history
        if old and deleted:
            values[field] = deleted[0]
        elif added:
            values[field] = added[0]
        elif unchanged:
            values[field] = unchanged[0]
    return values


def _keep_old_value(target: object, value: object, old: object, initiator: object) -> None:
    """A no-op: listened with ``active_history`` so setting an unloaded attribute loads its old value first."""


class CommitHook:
    """The listeners ``invalidate_on_commit`` installed; ``remove()`` takes them away again."""

    def __init__(self, target: Any, purger: Purger, tables: _Tables, engine: Engine | None) -> None:
        self.target = target
        self.purger = purger
        self.tables = tables
        self._engine = engine
        self._key = f"cachemw.pending.{id(self)}"
        self._listeners: dict[str, Callable[..., Any]] = {
            "before_flush": self._before_flush,
            "after_flush": self._after_flush,
            "do_orm_execute": self._statement,
            "after_commit": self._after_commit,
            "after_transaction_end": self._transaction_end,
        }
        for name, listener in self._listeners.items():
            event.listen(target, name, listener)

    def remove(self) -> None:
        for name, listener in self._listeners.items():
            event.remove(self.target, name, listener)

    def _ours(self, session: Session) -> bool:
        return self._engine is None or session.bind is self._engine

    def _pending(self, session: Session) -> dict[str, None]:
        pending: dict[str, None] = session.info.setdefault(self._key, {})
        return pending

    def _before_flush(self, session: Session, flush_context: UOWTransaction, instances: object) -> None:
        """Load what the tags of updated and deleted rows read while the rows still hold it."""
        if not self._ours(session):
            return
        try:
            with session.no_autoflush:
                for obj in (*session.dirty, *session.deleted):
                    tags = self.tables.of_class(type(obj))
                    if tags is not None:
                        state = inspect(obj)
                        for field in tags.fields:
                            state.attrs[field].load_history()
        except Exception:
            logger.exception("cachemw: reading the old values of a flush's rows failed")

    def _after_flush(self, session: Session, flush_context: UOWTransaction) -> None:
        if not self._ours(session):
            return
        try:
            pending = self._pending(session)
            for obj in session.new:
                self._add_row(pending, obj, old=False)
            for obj in session.dirty:
                if session.is_modified(obj, include_collections=False):
                    self._add_row(pending, obj, old=True)
                    self._add_row(pending, obj, old=False)
            for obj in session.deleted:
                self._add_row(pending, obj, old=True)
        except Exception:
            logger.exception("cachemw: collecting the tags of a flush's rows failed")

    def _add_row(self, pending: dict[str, None], obj: object, *, old: bool) -> None:
        tags = self.tables.of_class(type(obj))
        if tags is not None:
            pending.update(dict.fromkeys(tags.row(_values(inspect(obj), tags.fields, old=old))))

    def _statement(self, state: ORMExecuteState) -> None:
        if not (state.is_update or state.is_delete or state.is_insert) or not self._ours(state.session):
            return
        tags = self.tables.of_statement(state)
        if tags is not None:
            self._pending(state.session).update(dict.fromkeys(tags.coarse()))

    def _after_commit(self, session: Session) -> None:
        pending = session.info.pop(self._key, None)
        if not pending:
            return
        tags = list(pending)
        try:
            if in_greenlet():  # an AsyncSession's commit: the purge is awaited on its loop
                await_only(self.purger.apurge(tags))
            else:
                self.purger.purge(tags)
        except Exception:  # the commit is done; nothing of ours may make it look failed
            logger.exception("cachemw: purging %s after a commit failed", ", ".join(tags))

    def _transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:  # the outermost: after a commit nothing is left; after a rollback, drop it
            session.info.pop(self._key, None)


def invalidate_on_commit(target: Any, *, tags: Declared | None = None,
                         cache: CacheShell | Purger | None = None) -> CommitHook:
    """Purge the tags of the rows each committed transaction changed.

    ``target``: a ``sessionmaker`` or ``async_sessionmaker``, a ``Session`` or
    ``AsyncSession`` class, or an ``Engine``/``AsyncEngine`` (every session bound to it).
    ``tags``: mapped classes (or ``Table``s) to their templates, ``{Product: ["product:{id}"]}``;
    a mapped class may declare its own instead, ``__cachemw_tags__ = [...]``. Fields name
    the class's column attributes. ``cache``: the ``CacheMiddleware`` to purge through
    (ASGI or WSGI), or a ``Purger``; none: a ``Purger`` of this process's own, from
    the default settings (``CACHEMW_REDIS_URL``).
    """
    purger = cache if isinstance(cache, Purger) else Purger(cache)
    tables = _Tables(tags or {})
    event_target, engine = _event_target(target)
    return CommitHook(event_target, purger, tables, engine)


def _event_target(target: Any) -> tuple[Any, Engine | None]:
    """What the session events are listened on, and the engine a session must be bound to (if any)."""
    if isinstance(target, AsyncEngine):
        return Session, target.sync_engine
    if isinstance(target, Engine):
        return Session, target
    if isinstance(target, async_sessionmaker):
        # Its sessions' sync sessions are made from this class: a subclass of our own hears only them.
        base: type[Session] = target.kw.get("sync_session_class", Session)
        own = type(f"Cachemw{base.__name__}", (base,), {})
        target.configure(sync_session_class=own)
        return own, None
    if isinstance(target, sessionmaker):
        return target, None
    if isinstance(target, type) and issubclass(target, AsyncSession):
        return target.sync_session_class, None
    if isinstance(target, type) and issubclass(target, Session):
        return target, None
    raise TypeError(f"invalidate_on_commit: expected a sessionmaker, async_sessionmaker, Session or AsyncSession "
                    f"class, Engine or AsyncEngine, got {target!r}")
