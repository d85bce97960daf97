"""Small helpers shared by the golden-vector tests (loading lives in ``golden.py``)."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import golden
from dslaunch.errors import DslaunchError


def cases(name: str, key: str = 'cases') -> list[dict[str, Any]]:
    """The cases of one golden file, or ``[]`` (tests then skip) when the vectors are absent."""
    if not golden.available():
        return []
    return list(golden.load(name).get(key, []))


def fill(value: Any, **placeholders: Any) -> Any:
    """Replace ``<NAME>`` placeholders (``fill(v, CWD=..., TMP=...)``) in strings, lists and dicts."""
    if isinstance(value, str):
        for name, repl in placeholders.items():
            value = value.replace(f'<{name}>', str(repl))
        return value
    if isinstance(value, list):
        return [fill(v, **placeholders) for v in value]
    if isinstance(value, dict):
        return {fill(k, **placeholders): fill(v, **placeholders) for k, v in value.items()}
    return value


def builtin_type(name: str) -> type[BaseException] | None:
    """DeepSpeed's exception class by name, if it is a builtin."""
    typ = getattr(builtins, name, None)
    return typ if isinstance(typ, type) and issubclass(typ, BaseException) else None


def assert_same_error(exc: BaseException, expected: dict[str, str]) -> None:
    """A dslaunch error that still is DeepSpeed's builtin type and carries DeepSpeed's text."""
    assert isinstance(exc, DslaunchError), f'{type(exc).__name__}: {exc} is not a DslaunchError'
    typ = builtin_type(expected['type'])
    assert typ is not None and isinstance(exc, typ), f'{type(exc).__mro__} is not a {expected["type"]}'
    assert str(exc) == expected['message']


def write_exact(path: Path, text: str) -> Path:
    """Write ``text`` byte-exact (UTF-8, no newline translation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', encoding='utf-8', newline='') as f:
        f.write(text)
    return path


def ordered_equal(actual: dict[str, Any], expected: Any) -> None:
    """Equal as dicts and in key order (host order decides rank order)."""
    want = golden.ordered(expected)
    assert actual == want
    assert list(actual) == list(want)


__all__ = ['assert_same_error', 'builtin_type', 'cases', 'fill', 'ordered_equal', 'write_exact']
