"""Loading DeepSpeed's golden vectors from ``../shared/spec/golden`` (never copied into the repo)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

GOLDEN_DIR = Path(os.environ.get('DSLAUNCH_GOLDEN_DIR', Path(__file__).resolve().parents[1].parent / 'shared' / 'spec' / 'golden'))


def available() -> bool:
    return GOLDEN_DIR.is_dir()


def load(name: str) -> dict[str, Any]:
    """The parsed JSON of one golden file, e.g. ``load('hostfile_cases.json')``."""
    with open(GOLDEN_DIR / name, encoding='utf-8') as f:
        return json.load(f)


def ordered(value: Any) -> Any:
    """Turn the vectors' ``{"dict": {...}, "order": [...]}`` form into an insertion-ordered dict."""
    if isinstance(value, dict) and set(value) == {'dict', 'order'}:
        return {k: value['dict'][k] for k in value['order']}
    return value


def case_id(case: dict[str, Any]) -> str:
    return str(case.get('name') or case.get('topology') or json.dumps(case, sort_keys=True)[:60])
