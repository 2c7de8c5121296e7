"""``python -m bench NAME [ARGS ...]``: run the benchmark module ``bench.NAME``.

Each benchmark is a module in this package with ``main(argv: list[str]) -> int``.
``python -m bench`` with no name lists them.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def _names() -> list[str]:
    return sorted(
        info.name for info in pkgutil.iter_modules(bench.__path__) if not info.name.startswith("_")
    )


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    names = _names()
    if not args or args[0] in {"-h", "--help"}:
        print("usage: python -m bench NAME [ARGS ...]\n\nbenchmarks: " + ", ".join(names))
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in names:
        print(f"unknown benchmark {name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
