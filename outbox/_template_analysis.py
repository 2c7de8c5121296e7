"""Which variables a template needs: required, or optional behind a guard.

A name used anywhere unguarded is required. A name that is only used under
``{% if name is defined %}`` (or ``and``/``or``/``not`` of such tests, a
conditional expression, an ``elif``) or through ``| default`` is optional. The
catalog runs this over a template and everything it includes, once per template,
so that ``enqueue`` can name the missing variables before a message is written.
"""

from __future__ import annotations

from typing import NoReturn

from jinja2 import TemplateError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

_GUARD_TESTS = {"defined": True, "undefined": False}
_DEFAULT_FILTERS = frozenset({"default", "d"})


def _analysis_only(*args: object, **kwargs: object) -> NoReturn:
    raise TemplateError("this environment analyses templates; it does not render them")


def learn_names(env: ImmutableSandboxedEnvironment, tree: nodes.Template) -> None:
    """Stub unknown filters and tests: a channel's (Telegram's ``code``) are the renderer's."""
    for node in tree.find_all(nodes.Filter):
        env.filters.setdefault(node.name, _analysis_only)
    for test in tree.find_all(nodes.Test):
        env.tests.setdefault(test.name, _analysis_only)


def _guards(test: nodes.Node) -> tuple[frozenset[str], frozenset[str]]:
    """Names known to be defined when ``test`` is true, and when it is false."""
    none: frozenset[str] = frozenset()
    guard = isinstance(test, nodes.Test) and test.name in _GUARD_TESTS
    if guard and isinstance(test, nodes.Test) and isinstance(test.node, nodes.Name):
        names = frozenset({test.node.name})
        return (names, none) if _GUARD_TESTS[test.name] else (none, names)
    if isinstance(test, nodes.Not):
        when_true, when_false = _guards(test.node)
        return when_false, when_true
    if isinstance(test, nodes.And | nodes.Or):
        left_true, left_false = _guards(test.left)
        right_true, right_false = _guards(test.right)
        if isinstance(test, nodes.And):
            return left_true | right_true, left_false & right_false
        return left_true & right_true, left_false | right_false
    return none, none


def classify(
    node: nodes.Node,
    free: frozenset[str],
    guarded: frozenset[str],
    required: set[str],
    optional: set[str],
) -> None:
    """Sort every use of a free name below ``node`` into required or optional."""

    def visit(child: nodes.Node, guard: frozenset[str]) -> None:
        classify(child, free, guard, required, optional)

    if isinstance(node, nodes.Name):
        if node.ctx == "load" and node.name in free:
            (optional if node.name in guarded else required).add(node.name)
        return
    if (
        isinstance(node, nodes.Filter | nodes.Test)
        and isinstance(node.node, nodes.Name)
        and node.name in _DEFAULT_FILTERS | _GUARD_TESTS.keys()
    ):
        if node.node.name in free:
            optional.add(node.node.name)
        for arg in [*node.args, *node.kwargs]:
            visit(arg, guarded)
        return
    if isinstance(node, nodes.If | nodes.CondExpr):
        visit(node.test, guarded)
        when_true, when_false = _guards(node.test)
        if isinstance(node, nodes.CondExpr):
            visit(node.expr1, guarded | when_true)
            if node.expr2 is not None:
                visit(node.expr2, guarded | when_false)
            return
        for child in node.body:
            visit(child, guarded | when_true)
        otherwise = guarded | when_false
        for branch in node.elif_:
            visit(branch, otherwise)
            otherwise |= _guards(branch.test)[1]
        for child in node.else_:
            visit(child, otherwise)
        return
    if isinstance(node, nodes.And | nodes.Or):
        visit(node.left, guarded)
        left_true, left_false = _guards(node.left)
        visit(node.right, guarded | (left_true if isinstance(node, nodes.And) else left_false))
        return
    for child in node.iter_child_nodes():
        visit(child, guarded)
