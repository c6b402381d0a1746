"""Load a config from YAML plus `a.b.c=value` overrides; validate once; explain errors in one paragraph."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from rlhf_ray.config.schema import Config
from rlhf_ray.errors import RunError


class ConfigError(RunError, ValueError):
    """A config problem, already phrased for the user (the CLI prints it without a traceback)."""


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            line = p.read_bytes()[:e.start].count(b"\n") + 1
            raise ConfigError(f"config file {str(p)!r} is not valid UTF-8 (line {line}, byte "
                              f"0x{e.object[e.start]:02x}); save it as UTF-8") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, source=str(path) if path else "defaults")


def apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value`; the value is parsed as YAML, so `3`, `true`, `[a, b]` and `null` keep their types."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    set_dotted(raw, parts, value, what=f"override {item!r}")


def set_dotted(raw: dict, parts: list[str], value: Any, what: str = "key") -> None:
    """raw[a][b][c] = value for parts [a, b, c], making the sections that are missing."""
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{what}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def validate(raw: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(explain(e, source)) from None


def explain(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        kind = item["type"]
        if kind == "extra_forbidden":
            lines.append(_unknown_key(item["loc"]))
        elif kind == "value_error":
            msg = str(item.get("ctx", {}).get("error", item["msg"]))
            lines.append(f"{loc or '<top>'}: {msg}" if loc else msg)
        else:
            got = item.get("input")
            allowed = _allowed(item)
            lines.append(f"{loc}: {item['msg'].lower()} (got {got!r}){allowed}")
    head = f"invalid config ({source}): " if len(lines) == 1 else f"invalid config ({source}), {len(lines)} problems: "
    return head + "; ".join(lines)


def _allowed(item: dict) -> str:
    ctx = item.get("ctx") or {}
    if "expected" in ctx and str(ctx["expected"]) not in item["msg"]:
        return f"; allowed: {ctx['expected']}"
    return ""


def _unknown_key(loc: tuple) -> str:
    """Find the section model at loc[:-1] and suggest the nearest field name."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        model = _section_type(field.annotation) if field else None
    bad = str(loc[-1])
    where = ".".join(str(p) for p in loc)
    if model is None:
        return f"{where}: unknown key"
    names = list(model.model_fields)
    close = difflib.get_close_matches(bad, names, n=1, cutoff=0.5)
    if not close:  # abbreviations and long forms: `rank` for `r`, `lr_rate` for `lr`
        close = sorted((n for n in names if bad.startswith(n) or n.startswith(bad)), key=len, reverse=True)[:1]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{where}: unknown key '{bad}'{hint} (known keys here: {', '.join(names)})"


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_type(arg)
        if found:
            return found
    return None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dump_config(cfg))
