"""Tag templates: ``"product:{id}"`` filled from a request's path parameters or from a database row.

Pure. The ORM hooks (``cachemw.orm``) declare, per table, the tags its rows carry;
a change to a row purges the tags of its old and its new values, so a row whose
foreign key moved purges both sides. A bulk statement, whose rows are unknown,
purges the table's coarse tags: ``table:NAME`` and the templates that name no field.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cachemw.core.policy import ConfigError

__all__ = ["TableTags", "fill_template", "table_tag", "template_fields"]

FIELD = re.compile(r"{([^{}:]+)(?::[^{}]*)?}")
"""A template's field: ``{id}``, or ``{id:int}`` as a route declares its parameter."""


def template_fields(template: str) -> list[str]:
    return FIELD.findall(template)


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """``template`` with every field replaced by its value (each must be in ``values``)."""
    return FIELD.sub(lambda match: values[match.group(1)], template)


def table_tag(table: str) -> str:
    """The coarse tag every row of ``table`` carries (``table:products``): tag pages that list the table with it."""
    return "table:" + table


@dataclass(frozen=True, slots=True)
class TableTags:
    """The tags of one table's rows: built by ``for_table``, which checks every field against the columns."""

    table: str
    templates: tuple[str, ...]
    fields: tuple[str, ...]
    """The attributes the templates read, in order of first use."""

    @classmethod
    def for_table(cls, where: str, table: str, templates: Sequence[str] | str, columns: Collection[str]) -> TableTags:
        """``where`` names the declaration in errors (``tags for Product``); ``columns``: the fields a row has."""
        if isinstance(templates, str):
            raise ConfigError(f"{where}: expected a list of tag templates, got the string {templates!r}. "
                              f'HINT: write ["{templates}"]')
        fields: dict[str, None] = {}
        for template in templates:
            if not isinstance(template, str) or not template:
                raise ConfigError(f"{where}: a tag template must be a non-empty string, got {template!r}")
            for field in template_fields(template):
                if field not in columns:
                    raise ConfigError(f"{where}: tag {template!r} names {field!r}, which is not a column of "
                                      f"{table}; its columns are: {', '.join(sorted(columns))}")
                fields[field] = None
        return cls(table, tuple(dict.fromkeys(templates)), tuple(fields))

    def row(self, values: Mapping[str, object]) -> list[str]:
        """The tags of one row's ``values`` (its fields' values); a template whose field is None is skipped."""
        text = {name: str(value) for name, value in values.items() if value is not None}
        tags = [table_tag(self.table)]
        tags.extend(fill_template(template, text) for template in self.templates
                    if all(field in text for field in template_fields(template)))
        return tags

    def coarse(self) -> list[str]:
        """What a statement changing unknown rows purges: ``table:NAME`` and the templates that name no field."""
        return [table_tag(self.table), *(template for template in self.templates if not template_fields(template))]


def unique(tags: Iterable[str]) -> list[str]:
    """``tags`` without repeats or empty ones, in first-seen order."""
    return [tag for tag in dict.fromkeys(tags) if tag]
