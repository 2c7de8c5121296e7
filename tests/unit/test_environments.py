"""The renderer's compiled templates: contexts as Jinja makes them, output bounds."""

from __future__ import annotations

from pathlib import Path

from outbox._templates import TemplateCatalog
from outbox.dispatcher._environments import _Compiled, environments

BASE_URL = "https://platform.example.com"


def compiled(catalog: TemplateCatalog, channel: str, name: str) -> _Compiled:
    envs = environments(catalog, BASE_URL)
    env = envs.html if channel == "email" else envs.telegram if channel == "telegram" else envs.push
    loader_name = catalog.files(channel, name).main
    assert env.loader is not None
    tree = env.parse(env.loader.get_source(env, loader_name)[0])
    return _Compiled(env.get_template(loader_name), tree)


def test_a_render_context_is_the_one_jinja_would_make_with_fresh_state() -> None:
    for channel in ("email", "telegram", "push"):
        template = compiled(TemplateCatalog(), channel, "price_alert")
        values = {**template.globals, "instrument": "EURUSD"}
        ours, jinjas = template.new_context(values), template.template.new_context(values, True)
        assert type(ours) is type(jinjas)
        assert vars(ours).keys() == vars(jinjas).keys()
        for name in ("parent", "vars", "environment", "exported_vars", "name", "blocks"):
            assert getattr(ours, name) == getattr(jinjas, name), name
        assert ours.globals_keys == jinjas.globals_keys
        assert vars(ours.eval_ctx) == vars(jinjas.eval_ctx)
        # what a render changes is its own
        again = template.new_context(values)
        assert again.vars is not ours.vars and again.exported_vars is not ours.exported_vars
        assert again.eval_ctx is not ours.eval_ctx and again.blocks is not ours.blocks


def test_only_templates_that_cannot_loop_are_joined_at_once(tmp_path: Path) -> None:
    (tmp_path / "telegram").mkdir()
    (tmp_path / "telegram" / "loop.md.j2").write_text("{% for x in xs %}{{ x }}{% endfor %}")
    catalog = TemplateCatalog(tmp_path)
    assert compiled(catalog, "push", "price_alert").bounded
    assert not compiled(catalog, "telegram", "loop").bounded
    assert not compiled(catalog, "email", "price_alert").bounded  # extends a layout
