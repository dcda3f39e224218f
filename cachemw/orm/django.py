"""Django: after a transaction commits, purge the tags of every row it saved or deleted.

``post_save``, ``post_delete`` and ``m2m_changed`` add a row's tags to its
database connection's pending set; one ``transaction.on_commit`` callback per
transaction purges the set once, so a rollback (of the transaction, or of the
savepoint the callback was registered in) purges nothing. An updated row's old
values are read in ``pre_save`` (one query, only for models whose templates name
a column other than the primary key), so a moved foreign key purges both sides.
Outside a transaction (autocommit) each statement's rows are purged at once.

Django sends no signal for ``QuerySet.update()``, ``bulk_create()`` and
``bulk_update()``: a model whose manager is ``PurgingQuerySet.as_manager()`` purges
its coarse tags (``table:<db_table>`` and the templates naming no column) after
them, since their rows are unknown. Raw SQL is not seen.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from django.db import models  # type: ignore[import-untyped]

from cachemw.core.policy import ConfigError
from cachemw.core.tags import TableTags
from cachemw.orm.purger import Purger
from cachemw.runtime.shell import CacheShell

__all__ = ["DjangoHook", "PurgingQuerySet", "invalidate_on_commit", "serve_purges_through"]

logger = logging.getLogger("cachemw.orm")

DECLARED = "__cachemw_tags__"
SETTING = "CACHEMW_MODEL_TAGS"
_OLD = "_cachemw_old_tags"
_CLEARED = "_cachemw_cleared"

_hooks: list[DjangoHook] = []
_served_by: list[CacheShell] = []


class _Batch:
    """One transaction's pending tags and the on_commit callback that purges them."""

    def __init__(self, hook: DjangoHook, connection: Any) -> None:
        self.tags: dict[str, None] = {}
        self._hook = hook
        self._connection = connection

    def run(self) -> None:
        self._hook.batches.pop(self._connection, None)
        self._hook.purger.purge(list(self.tags))


class DjangoHook:
    """The signal receivers ``invalidate_on_commit`` connected; ``disconnect()`` takes them away again."""

    def __init__(self, tables: dict[type, TableTags], purger: Purger, *, defaulted: bool) -> None:
        self.tables: dict[type, TableTags | None] = dict(tables)
        self.purger = purger
        self.defaulted = defaulted  # a Purger of its own: a middleware made later may serve it instead
        self.batches: weakref.WeakKeyDictionary[Any, _Batch] = weakref.WeakKeyDictionary()
        self._guard = threading.Lock()
        from django.db.models import signals  # type: ignore[import-untyped]

        self._signals = ((signals.pre_save, self._pre_save), (signals.post_save, self._post_save),
                         (signals.post_delete, self._post_delete), (signals.m2m_changed, self._m2m_changed))
        for signal, receiver in self._signals:
            signal.connect(receiver, weak=False, dispatch_uid=(id(self), signal))

    def disconnect(self) -> None:
        for signal, _ in self._signals:
            signal.disconnect(dispatch_uid=(id(self), signal))
        if self in _hooks:
            _hooks.remove(self)

    # -- receivers (never raise: a save never fails because of the cache) ---------------------------

    def _pre_save(self, sender: Any, instance: Any, raw: bool = False, using: str = "default", **_: Any) -> None:
        tags = self._of(sender)
        if tags is None or instance._state.adding or instance.pk is None:
            return
        pk = sender._meta.pk
        if all(field in (pk.attname, pk.name, "pk") for field in tags.fields):
            return  # the primary key does not move: the new values say it all
        try:
            old = sender._base_manager.using(using).filter(pk=instance.pk).values(*tags.fields).first()
        except Exception:
            logger.exception("cachemw: reading the old values of %s %r failed", sender.__name__, instance.pk)
            return
        if old is not None:
            setattr(instance, _OLD, tags.row(old))

    def _post_save(self, sender: type, instance: Any, using: str = "default", **_: Any) -> None:
        tags = self._of(sender)
        if tags is not None:
            old: list[str] = instance.__dict__.pop(_OLD, [])
            self._add(using, [*old, *tags.row(_values(instance, tags.fields))])

    def _post_delete(self, sender: type, instance: Any, using: str = "default", **_: Any) -> None:
        tags = self._of(sender)
        if tags is not None:
            self._add(using, tags.row(_values(instance, tags.fields)))

    def _m2m_changed(self, sender: type, instance: Any, action: str, model: Any, pk_set: set[Any] | None,
                     using: str = "default", **_: Any) -> None:
        if action == "pre_clear" and self._of(model) is not None:
            # clear() does not say which rows it lets go of: read them while the links still exist.
            setattr(instance, _CLEARED, _linked(sender, instance, model, using))
            return
        if action not in ("post_add", "post_remove", "post_clear"):
            return
        if action == "post_clear":
            pk_set = instance.__dict__.pop(_CLEARED, None)
        wanted: list[str] = []
        own = self._of(type(instance))
        if own is not None:
            wanted.extend(own.row(_values(instance, own.fields)))
        through = self._of(sender)
        if through is not None:
            wanted.extend(through.coarse())
        related = self._of(model)
        if related is not None:
            if pk_set is None:  # clear(), and its rows could not be read
                wanted.extend(related.coarse())
            elif pk_set:
                try:
                    rows = model._base_manager.using(using).filter(pk__in=pk_set).values(*related.fields)
                    for row in rows:
                        wanted.extend(related.row(row))
                except Exception:
                    logger.exception("cachemw: reading the rows %s %r failed", model.__name__, sorted(pk_set))
                    wanted.extend(related.coarse())
        if wanted:
            self._add(using, wanted)

    # -- one purge per transaction ---------------------------------------------------------------------

    def _add(self, using: str, tags: Iterable[str]) -> None:
        from django.db import transaction

        try:
            connection = transaction.get_connection(using)
            if not connection.in_atomic_block:
                self.purger.purge(tags)  # autocommit: the statement is committed already
                return
            with self._guard:
                batch = self.batches.get(connection)
                # A savepoint's rollback discards the callbacks registered inside it: start a new batch then.
                if batch is None or not any(entry[1] == batch.run for entry in connection.run_on_commit):
                    batch = self.batches[connection] = _Batch(self, connection)
                    transaction.on_commit(batch.run, using=using)
                batch.tags.update(dict.fromkeys(tags))
        except Exception:
            logger.exception("cachemw: recording the tags of a saved row failed")

    def _of(self, model: type) -> TableTags | None:
        tags = self.tables.get(model)
        if tags is None and model not in self.tables:
            concrete = getattr(getattr(model, "_meta", None), "concrete_model", None)
            tags = self.tables.get(concrete) if concrete is not None else None
            self.tables[model] = tags
        return tags


class PurgingQuerySet(models.QuerySet):  # type: ignore[misc]
    """A QuerySet whose ``update()``, ``bulk_create()`` and ``bulk_update()`` purge the model's coarse tags after
    the commit: ``objects = PurgingQuerySet.as_manager()``."""

    def update(self, **kwargs: Any) -> int:
        count: int = super().update(**kwargs)
        _bulk(self.model, self.db)
        return count

    def bulk_create(self, *args: Any, **kwargs: Any) -> list[Any]:
        created: list[Any] = super().bulk_create(*args, **kwargs)
        _bulk(self.model, self.db)
        return created

    def bulk_update(self, *args: Any, **kwargs: Any) -> int:
        count: int = super().bulk_update(*args, **kwargs)
        _bulk(self.model, self.db)
        return count


def _bulk(model: Any, using: str) -> None:
    for hook in _hooks:
        tags = hook._of(model)
        if tags is not None:
            hook._add(using, tags.coarse())


def _linked(through: Any, instance: Any, model: Any, using: str) -> set[Any] | None:
    """The primary keys of the ``model`` rows ``instance`` is linked to through ``through``; None if unclear."""
    fields = [field for field in through._meta.concrete_fields if field.is_relation]
    own = [field for field in fields if field.related_model is instance._meta.concrete_model]
    other = [field for field in fields if field.related_model is model._meta.concrete_model]
    if len(own) != 1 or len(other) != 1 or own == other:  # a model linked to itself: say nothing
        return None
    try:
        return set(through._base_manager.using(using).filter(**{own[0].attname: instance.pk})
                   .values_list(other[0].attname, flat=True))
    except Exception:
        logger.exception("cachemw: reading the links %s clears failed", through.__name__)
        return None


def _values(instance: Any, fields: Sequence[str]) -> dict[str, object]:
    return {field: getattr(instance, field, None) for field in fields}


def _table_tags(model: Any, templates: Sequence[str]) -> TableTags:
    meta = model._meta
    columns = {"pk", *(field.attname for field in meta.concrete_fields)}  # customer_id, not customer: no query
    return TableTags.for_table(f"tags for {meta.label}", meta.db_table, templates, columns)


def _declared(tags: Mapping[Any, Sequence[str]] | None) -> dict[type, TableTags]:
    """Models to their tags: given, else ``settings.CACHEMW_MODEL_TAGS``; plus each model's ``__cachemw_tags__``."""
    from django.apps import apps  # type: ignore[import-untyped]
    from django.conf import settings  # type: ignore[import-untyped]

    if tags is None:
        tags = getattr(settings, SETTING, None) or {}
        if not isinstance(tags, Mapping):
            raise ConfigError(f"Django setting {SETTING}: expected a dict of models to tag templates, got "
                              f"{type(tags).__name__}")
    found: dict[type, TableTags] = {}
    for key, templates in tags.items():
        if isinstance(key, str):
            try:
                model = apps.get_model(key)
            except (LookupError, ValueError) as exc:
                raise ConfigError(f"{SETTING}: {key!r} names no model ({exc}); write 'app_label.ModelName'") from None
        else:
            model = key
        found[model] = _table_tags(model, templates)
    for model in apps.get_models():
        templates = model.__dict__.get(DECLARED)
        if templates is not None and model not in found:
            found[model] = _table_tags(model, templates)
    return found


def invalidate_on_commit(tags: Mapping[Any, Sequence[str]] | None = None, *,
                         cache: CacheShell | Purger | None = None) -> DjangoHook:
    """Purge the tags of the rows each committed transaction saved or deleted; call it in ``AppConfig.ready()``.

    ``tags``: models (or ``"app_label.Model"``) to their templates, ``{Product: ["product:{id}"]}``;
    default ``settings.CACHEMW_MODEL_TAGS``. A model may declare its own,
    ``__cachemw_tags__ = [...]``. Fields name the model's columns by attribute
    (``customer_id``, not ``customer``; ``id`` or ``pk``). ``cache``: the middleware or ``Purger`` to purge through;
    by default the middleware ``cachemw.django``'s ``asgi_application`` or
    ``wsgi_application`` made in this process, else a ``Purger`` of its own from
    ``settings.CACHEMW`` (a worker, a management command).
    """
    defaulted = cache is None
    if isinstance(cache, Purger):
        purger = cache
    elif cache is not None:
        purger = Purger(cache)
    elif _served_by:
        purger = Purger(_served_by[-1])
    else:
        purger = Purger(**_purger_options())
    hook = DjangoHook(_declared(tags), purger, defaulted=defaulted)
    _hooks.append(hook)
    return hook


def serve_purges_through(cache: CacheShell) -> None:
    """The hooks made without ``cache=`` purge through this middleware (the project's, made in this process)."""
    _served_by[:] = [cache]  # the latest only: a process that makes its application again serves the new one
    for hook in _hooks:
        if hook.defaulted:
            hook.purger.close()  # a cache of its own, if it started one
            hook.purger = Purger(cache)


def _purger_options() -> dict[str, Any]:
    from django.conf import settings

    configured = getattr(settings, "CACHEMW", None) or {}
    return {name: configured[name] for name in ("config", "redis_url", "key_prefix") if name in configured}
