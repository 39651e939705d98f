"""``genrep-fast config show``: every config key with its value, its default and its help.

The help of a key is the comment that documents its field in ``genrep_fast/train/config.py``
(the comment at the end of the field's line, after any comment lines just above it): the schema
stays the one place where a key is described.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from genrep_fast.train.config import TrainConfig, flatten

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")
_COMMENT_LINE = re.compile(r"^\s+#\s?(.*)$")


def _field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} of a dataclass, read from its source."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source shipped: no help, the keys are still listed
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        c = _COMMENT_LINE.match(line)
        if c:
            above.append(c.group(1).strip())
            continue
        f = _FIELD_LINE.match(line)
        if f and f.group(1) in names and f.group(1) not in out:
            parts = above + ([f.group(2).strip()] if f.group(2) else [])
            out[f.group(1)] = " ".join(p for p in parts if p)
        above = []
    return out


def key_help() -> dict[str, str]:
    """{dotted key: help} for every key of ``TrainConfig`` (an empty string where undocumented)."""
    out: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        comments = _field_comments(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = comments.get(f.name, "")

    walk(TrainConfig, "")
    return out


def section_help() -> dict[str, str]:
    """{section name: the first line of its dataclass docstring}."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        cls = hints[f.name]
        if dataclasses.is_dataclass(cls):
            doc = cls.__dict__.get("__doc__") or ""
            if doc.startswith(f"{cls.__name__}("):  # the signature dataclass writes: no docstring
                doc = ""
            out[f.name] = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ")
    return out


def show(cfg: TrainConfig, name: str) -> str:
    """The text ``config show`` prints: ``key: value`` (``(default: X)`` where the config sets
    another value) and the key's help, section by section."""
    values = flatten(cfg.to_dict())
    defaults = flatten(TrainConfig().to_dict())
    helps = key_help()
    sections = section_help()
    lines = [
        f"# config {name}: every key, its value here, its default where different, and its help",
        "# (set any of them with --set key=value)",
    ]
    current = None
    for key, value in values.items():
        section = key.split(".")[0] if "." in key else None
        if section != current:
            current = section
            if section:
                about = sections.get(section)
                lines += ["", f"{section}:" + (f"  # {about}" if about else "")]
        text = f"{key}: {_fmt(value)}"
        if defaults.get(key) != value:
            text += f"  (default: {_fmt(defaults.get(key))})"
        if helps.get(key):
            text += f"  # {helps[key]}"
        lines.append(("  " if section else "") + text)
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)
