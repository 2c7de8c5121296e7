"""Frozen dataclass values built on the hot path without their ``__init__``'s cost.

A frozen dataclass's generated ``__init__`` sets every field through
``object.__setattr__`` (the class forbids plain assignment), which for a claimed
message's 17 fields costs as much as the rest of decoding its row. A builder takes
the same arguments, with the same defaults, and stores them directly: into the
slots through their descriptors, or into the instance ``__dict__``. The value is
the same (equal, hashed alike, as immutable as one the constructor builds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, TypeVar

_T = TypeVar("_T")


def value_builder(cls: type[_T]) -> Callable[..., _T]:
    """A function that builds ``cls`` values as ``cls(...)`` does, faster.

    ``cls`` is a frozen dataclass without ``__post_init__`` and without field
    factories (a builder runs neither); arguments may be given by position (field
    order) or by name.
    """
    assert is_dataclass(cls) and cls.__dataclass_params__.frozen, cls  # type: ignore[attr-defined]
    assert not hasattr(cls, "__post_init__"), f"{cls.__name__} has a __post_init__"
    slotted = "__slots__" in cls.__dict__
    namespace: dict[str, Any] = {"new": object.__new__, "cls": cls}
    params, body = [], []
    for number, f in enumerate(fields(cls)):
        assert f.default_factory is MISSING, f"{cls.__name__}.{f.name} has a factory"
        if f.default is MISSING:
            params.append(f.name)
        else:
            namespace[f"default_{number}"] = f.default
            params.append(f"{f.name}=default_{number}")
        if slotted:
            namespace[f"set_{number}"] = cls.__dict__[f.name].__set__  # the slot's descriptor
            body.append(f"    set_{number}(o, {f.name})")
        else:
            body.append(f"    d[{f.name!r}] = {f.name}")
    first = "    o = new(cls)" if slotted else "    o = new(cls)\n    d = o.__dict__"
    source = f"def build({', '.join(params)}):\n{first}\n" + "\n".join(body) + "\n    return o\n"
    exec(source, namespace)  # noqa: S102 (built above from the class's own field names)
    built: Callable[..., _T] = namespace["build"]
    return built
