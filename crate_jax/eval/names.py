"""Class names and prompt templates for zero-shot evaluation and bundles: files of one name per line (templates
contain `{}`), or a JSON file with a `classes` list (as `crate_jax.data.image_text.synth_scenes` writes); a bare file name is
looked up in `crate_jax/eval/assets/`."""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def resolve_asset(path: str | Path) -> Path:
    """An existing file, or a bare name of a file shipped in `crate_jax/eval/assets/`."""
    p = Path(path)
    if p.is_file():
        return p
    if (ASSETS / p.name).is_file() and len(p.parts) == 1:
        return ASSETS / p.name
    raise FileNotFoundError(f"{path}: no such file (and no {p.name!r} in {ASSETS}); expected class names or "
                            f"prompt templates, one per line")


def load_classnames(path: str | Path) -> list[str]:
    """Class names: one per line, or a JSON file with a `classes` list."""
    p = resolve_asset(path)
    if p.suffix == ".json":
        info = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("classes"), list):
            raise ValueError(f"{p}: expected a JSON object with a 'classes' list of names")
        names = [str(c) for c in info["classes"]]
    else:
        names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{p}: no class names found")
    return names


def load_templates(path: str | Path) -> list[str]:
    """Prompt templates, one per line, each containing `{}` where the class name goes."""
    p = resolve_asset(path)
    out = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [t for t in out if "{}" not in t]
    if not out or bad:
        raise ValueError(f"{p}: every prompt template must contain '{{}}' (for the class name); "
                         f"{'no templates found' if not out else f'offending lines: {bad[:3]}'}")
    return out
