"""``iptables-save`` output, parsed, and the questions asked of it. Pure."""

from __future__ import annotations

Saved = dict[str, list[str]]  # table -> its ":CHAIN ..." and "-A ..." lines


def parse_saved(saved: str) -> Saved:
    """``iptables-save`` output as {table: [":CHAIN ..." and "-A ..." lines]}."""
    out: Saved = {}
    current: list[str] | None = None
    for line in saved.splitlines():
        if line.startswith("*"):
            current = out.setdefault(line[1:], [])
        elif current is not None and (line.startswith("-A ") or line.startswith(":")):
            current.append(line)
    return out


def normalize(rule: str) -> str:
    """iptables-save prints comments unquoted and some matches in its own order and forms."""
    return " ".join(rule.replace('"', "").split())


def has_rule(present: Saved, table: str, chain: str, match: str) -> bool:
    want = normalize(f"-A {chain} {match}")
    return any(normalize(r) == want for r in present.get(table, []))
