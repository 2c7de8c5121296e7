"""The sandboxed Jinja environments one catalog renders with, built once per catalog.

Four environments per catalog and base URL: HTML (autoescaped), plain text, Telegram
MarkdownV2 (every variable escaped) and push JSON (every variable escaped for a JSON
string). With the renderer's ``platform_base_url``, ``platform_url('<constant>')``
is computed once per template, when it is compiled (see
:meth:`~outbox._templates.TemplateCatalog.create_environment`).
:meth:`Environments.render` streams a template's output against a budget.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jinja2 import Template, nodes
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from outbox._templates import TemplateCatalog
from outbox.dispatcher import markdown

_CONTEXT_STATE = frozenset(
    {"parent", "vars", "environment", "eval_ctx", "exported_vars", "name", "globals_keys", "blocks"}
)
_EVAL_STATE = frozenset({"environment", "autoescape", "volatile"})
_new = object.__new__
_UNBOUNDED = (
    nodes.For,
    nodes.Macro,
    nodes.CallBlock,
    nodes.Include,
    nodes.Extends,
    nodes.Import,
    nodes.FromImport,
    nodes.Block,
)
"""Nodes after which a template's count of output parts is not fixed by its text."""


class _Compiled:
    """One compiled template, and what each render of it starts from.

    Jinja builds every render's ``Context`` (and its ``EvalContext``) through their
    ``__init__``, copying the template's globals into a new set on the way; here a
    context is made as one made when the template was compiled, attribute by
    attribute, with its own variables, exported names, blocks and evaluation state
    (what a render changes). Should Jinja's context hold anything else, renders
    take Jinja's own way (``new_context``) instead.
    """

    def __init__(self, template: Template, tree: nodes.Template) -> None:
        # Jinja keeps a template's globals in a ChainMap that every context
        # creation iterates; these environments never change their globals.
        template.globals = dict(template.globals)
        self.template = template
        self.globals = template.globals
        self.bounded = not any(tree.find_all(_UNBOUNDED))
        """The template yields a bounded number of parts: no loop, and nothing taken
        from another template (which could loop)."""
        proto = template.new_context({}, shared=True)
        self._proto: Context | None = None
        if (
            type(proto) is Context
            and vars(proto).keys() == _CONTEXT_STATE
            and type(proto.eval_ctx) is EvalContext
            and vars(proto.eval_ctx).keys() == _EVAL_STATE
        ):
            self._proto = proto

    def new_context(self, values: dict[str, Any]) -> Context:
        """``template.new_context(values, shared=True)``."""
        proto = self._proto
        if proto is None:
            return self.template.new_context(values, shared=True)
        eval_ctx = _new(EvalContext)
        eval_ctx.environment = proto.eval_ctx.environment
        eval_ctx.autoescape = proto.eval_ctx.autoescape
        eval_ctx.volatile = False
        context: Context = _new(Context)
        context.parent = values
        context.vars = {}
        context.environment = proto.environment
        context.eval_ctx = eval_ctx
        context.exported_vars = set()
        context.name = proto.name
        context.globals_keys = proto.globals_keys  # only read by Jinja
        context.blocks = {name: [block] for name, block in self.template.blocks.items()}
        return context


@dataclass(frozen=True, kw_only=True)
class Environments:
    html: ImmutableSandboxedEnvironment
    text: ImmutableSandboxedEnvironment
    telegram: ImmutableSandboxedEnvironment
    push: ImmutableSandboxedEnvironment
    compiled: dict[tuple[int, str], _Compiled] = field(default_factory=dict)
    """(environment id, loader name) -> the compiled template."""

    def render(
        self,
        env: ImmutableSandboxedEnvironment,
        name: str,
        context: Mapping[str, Any],
        *,
        limit: int,
    ) -> str:
        """Render template ``name`` of ``env`` (one of ours) with ``context``.

        What ``Template.render`` does, minus its per-call costs: the environment's
        template cache is a locked LRU, every call copies the template's globals
        (a ``ChainMap``, slow to iterate) into the new context, and builds that
        context from scratch. These are done once per template here
        (:class:`_Compiled`); the context is still a fresh one per call.
        The output of a template that loops (or takes parts from another) is
        streamed: past ``limit`` characters rendering stops with
        :class:`OutputTooLong`, before the rest is produced; one that cannot is
        joined at once and then measured against ``limit``.
        """
        key = (id(env), name)
        compiled = self.compiled.get(key)
        if compiled is None:
            assert env.loader is not None
            tree = env.parse(env.loader.get_source(env, name)[0])
            compiled = self.compiled.setdefault(key, _Compiled(env.get_template(name), tree))
        ctx = compiled.new_context({**compiled.globals, **context})
        if compiled.bounded:  # a few parts, each as long as a var at most: joined at once
            try:
                text = "".join(compiled.template.root_render_func(ctx))
            except Exception:
                env.handle_exception()
                raise
            if len(text) > limit:
                raise OutputTooLong(limit)
            return text
        parts: list[str] = []
        size = 0
        try:
            for part in compiled.template.root_render_func(ctx):
                size += len(part)
                if size > limit:
                    raise OutputTooLong(limit)
                parts.append(part)
        except OutputTooLong:
            raise
        except Exception:
            env.handle_exception()  # re-raises with the template's line numbers
            raise
        return "".join(parts)


class OutputTooLong(Exception):
    """A template produced more than its channel's output budget."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the template produced over {limit} characters (shorten the variables or the template)"
        )


_cache: weakref.WeakKeyDictionary[TemplateCatalog, dict[str | None, Environments]] = (
    weakref.WeakKeyDictionary()
)
_cache_lock = threading.Lock()
_latest: tuple[TemplateCatalog, str | None, Environments] | None = None
"""The last answer of :func:`environments`, looked at without the lock (one tuple,
replaced whole). It keeps that catalog alive, as its renderer does anyway."""


def environments(catalog: TemplateCatalog, platform_base_url: str | None = None) -> Environments:
    """Return the catalog's rendering environments for ``platform_base_url`` (built
    once per catalog and base URL; they cache compiled templates).
    """
    global _latest
    latest = _latest  # the common case: the one renderer of this process asks again
    if latest is not None and latest[0] is catalog and latest[1] == platform_base_url:
        return latest[2]
    with _cache_lock:
        by_base = _cache.setdefault(catalog, {})
        found = by_base.get(platform_base_url)
        if found is None:
            base = platform_base_url
            found = Environments(
                html=catalog.create_environment(autoescape=True, platform_base_url=base),
                text=catalog.create_environment(platform_base_url=base),
                telegram=catalog.create_environment(
                    finalize=markdown.finalize, filters=markdown.FILTERS, platform_base_url=base
                ),
                push=catalog.create_environment(json_strings=True, platform_base_url=base),
            )
            by_base[platform_base_url] = found
        _latest = (catalog, platform_base_url, found)
        return found
