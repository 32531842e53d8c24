"""The YAML `medpose plan` writes (launch/plan.py): the planned values in flow style with the reason for each beside it
as a comment, keeping the bundled base config's layout and comments where it has the simple one."""
from __future__ import annotations

from typing import Sequence

import re

import numpy as np
import yaml


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _flow(value) -> str:
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10 ** 6, allow_unicode=True,
                          sort_keys=False).strip()
    if text.endswith("..."):
        text = text[:-3].strip()
    return text


def emit_yaml(raw: dict, comments: dict[str, str], header: Sequence[str] = ()) -> str:
    """`raw` (section -> key -> value) as YAML: flow-style values, `# reason` after every commented dotted key; a
    mapping with a commented key inside (model.args.width) is written as a block so each key carries its own."""
    lines = [f"# {h}" if h else "#" for h in header]

    def walk(node: dict, prefix: str, indent: int) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            pad = "  " * indent
            inner = isinstance(value, dict) and value and any(c.startswith(dotted + ".") for c in comments)
            if inner:
                lines.append(f"{pad}{key}:" + (f"  # {comments[dotted]}" if dotted in comments else ""))
                walk(value, dotted + ".", indent + 1)
            elif isinstance(value, dict) and indent == 0:
                lines.append(f"{pad}{key}:")
                walk(value, dotted + ".", indent + 1)
            else:
                line = f"{pad}{key}: {_flow(value)}"
                lines.append(line + (f"  # {comments[dotted]}" if dotted in comments else ""))

    walk(raw, "", 0)
    return "\n".join(lines) + "\n"


_SECTION = re.compile(r"^([A-Za-z_]\w*):\s*(#.*)?$")
_KEY = re.compile(r"^  ([A-Za-z_]\w*):(.*)$")


def emit_from_base(base_text: str, raw: dict, comments: dict[str, str], header: Sequence[str] = ()) -> str | None:
    """The base config's own text with the changed keys rewritten (flow-style value, `# reason`), new keys added at
    the end of their section and new sections at the end: the base config's comments stay. None when the base file
    is not in the bundled configs' simple layout (sections of one-line `key: value` entries), then emit_yaml."""
    base_raw = yaml.safe_load(base_text) or {}
    lines = base_text.splitlines()
    section, seen, last_key, layout = None, {}, {}, []
    for i, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            layout.append(("text", None, None))
            continue
        m = _SECTION.match(line)
        if m:
            section = m.group(1)
            seen[section] = []
            layout.append(("section", section, None))
            continue
        k = _KEY.match(line)
        if not k or section is None or k.group(2).strip() in ("", "|", ">") or k.group(2).lstrip().startswith("#"):
            return None
        seen[section].append(k.group(1))
        last_key[section] = i
        layout.append(("key", section, k.group(1)))

    def comment_for(dotted: str) -> str:
        if dotted in comments:
            return comments[dotted]
        inner = [f"{c[len(dotted) + 1:]}: {r}" for c, r in comments.items() if c.startswith(dotted + ".")]
        return "; ".join(inner)

    def entry(sec: str, key: str) -> str:
        note = comment_for(f"{sec}.{key}")
        return f"  {key}: {_flow(raw[sec][key])}" + (f"  # {note}" if note else "")

    out = [f"# {h}" if h else "#" for h in header]
    out.append("# --- the base config, its comments kept; planned and given values carry their reason ---")
    for i, (line, (kind, sec, key)) in enumerate(zip(lines, layout)):
        if kind == "key":
            if key not in raw.get(sec, {}):
                continue
            same = _plain(raw[sec][key]) == _plain((base_raw.get(sec) or {}).get(key))
            out.append(line if same and not comment_for(f"{sec}.{key}") else entry(sec, key))
        else:
            out.append(line)
        if kind in ("key", "section") and last_key.get(sec, i) == i:
            for extra in raw.get(sec, {}) if isinstance(raw.get(sec), dict) else ():
                if extra not in seen.get(sec, []):
                    out.append(entry(sec, extra))
    rest = {s: v for s, v in raw.items() if s not in seen}
    if rest:
        out.append(emit_yaml(rest, comments).rstrip("\n"))
    return "\n".join(out) + "\n"


