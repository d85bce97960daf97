"""``--world_info``: the active resources, as DeepSpeed passes them from runner to launch.py.

The wire format is fixed by mixed-version clusters (a DeepSpeed runner driving a dslaunch
launcher and vice versa): URL-safe base64, padding kept, of ``json.dumps`` with Python's
default separators and ``ensure_ascii``. Decoding accepts what DeepSpeed's launcher accepts
(either base64 alphabet) but reports garbage as one ``WorldInfoError`` line instead of a
``binascii``/``UnicodeDecodeError``/``JSONDecodeError`` traceback.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence

from .errors import WorldInfoError, printable

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any

__all__ = ['NONE_SENTINEL', 'decode_world_info', 'encode_world_info']

# launch.py's default for --world_info is the string "None", not None.
NONE_SENTINEL = 'None'

WorldInfo = dict[str, list[int | str]]


def encode_world_info(world_info: Mapping[str, Sequence[Any]]) -> str:
    """Encode ``{host: [slot, ...]}`` byte-identically to DeepSpeed's runner."""
    text = json.dumps(dict(world_info))  # defaults matter: ", " / ": " separators, ASCII escapes
    return base64.urlsafe_b64encode(text.encode('utf-8')).decode('ascii')


def decode_world_info(encoded: str) -> WorldInfo:
    """Decode a ``--world_info`` value into ``{host: [slot, ...]}`` (host order kept)."""
    if encoded == NONE_SENTINEL:
        raise WorldInfoError('world_info can not be None')
    try:
        # urlsafe_b64decode maps -_ to +/ first, so the standard alphabet decodes too.
        raw = base64.urlsafe_b64decode(encoded)
    except (binascii.Error, ValueError) as exc:
        raise WorldInfoError(f'--world_info is not valid base64 ({exc}): {_clip(encoded)}') from None
    try:
        # bytes, as launch.py passes them: json detects a UTF-8 BOM and UTF-16/32 like DeepSpeed does.
        value = json.loads(raw)
    except UnicodeDecodeError:
        raise WorldInfoError(f'--world_info does not decode to UTF-8 JSON: {_clip(encoded)}') from None
    except (ValueError, RecursionError) as exc:
        raise WorldInfoError(f'--world_info does not decode to JSON ({exc}): {_clip(encoded)}') from None
    return _checked(value, encoded)


def _checked(value: Any, encoded: str) -> WorldInfo:
    """Insist on ``{str: [int | str, ...]}`` so launch.py's arithmetic cannot fail later."""
    if not isinstance(value, dict):
        raise WorldInfoError(
            f'--world_info must be a JSON object mapping hosts to slot lists, got {type(value).__name__}: {_clip(encoded)}'
        )
    for host, slots in value.items():
        if not isinstance(slots, list) or not all(_is_slot(s) for s in slots):
            raise WorldInfoError(f'--world_info host {host!r} must map to a list of device ids, got {slots!r}')
    return value


def _is_slot(slot: Any) -> bool:
    # bool is an int subclass; true/false are not device ids.
    return (isinstance(slot, int) and not isinstance(slot, bool)) or isinstance(slot, str)


def _clip(text: str, limit: int = 80) -> str:
    return printable(text, limit)
