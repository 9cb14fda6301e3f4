"""From what the kernel holds to what ``rules`` renders: the ``iptables-restore --noflush``
input of a change (rewriting or editing only the chains that differ), of removing everything
of ours, and the differences ``check`` reports. Pure."""

from __future__ import annotations

import difflib

from ..errors import KernelError
from ..naming import NET_CHAINS, Names
from . import FirewallPlan
from .rules import DOCKER_USER, FILTER, fast_path, jumps, render, tables
from .saved import Saved, has_rule, normalize


def table_of(names: Names, chain: str) -> str:
    """The table one of our chains (top-level or per-network) lives in."""
    for table, ours_ in tables(names).items():
        if chain in ours_:
            return table
    return NET_CHAINS[chain[len(names.prefix) + 1]]


def restore_input(
    plan: FirewallPlan,
    version: int,
    names: Names,
    *,
    docker_isolation: bool,
    present: Saved | None,
) -> str:
    """``iptables-restore --noflush`` input that makes our chains exactly ``plan``.

    ``present``: the parsed iptables-save, when the jumps into our chains (and chains of ours
    left in an old table) must be checked; None when they are known to be in place.
    """
    chains = render(plan, version, names, docker_isolation=docker_isolation)
    return restore_changes(chains, version, names, present=present, previous=None)


def restore_changes(
    chains: dict[str, list[str]],
    version: int,
    names: Names,
    *,
    present: Saved | None,
    previous: dict[str, list[str]] | None,
    bridged_set: bool = False,
) -> str:
    """``iptables-restore --noflush`` input taking our chains to ``chains`` (``render``).

    ``previous``: what the kernel is known to hold (the last apply's ``chains``): only the
    chains whose rules differ are declared (declaring empties them) and rewritten, and those
    gone are deleted, so the cost of a change is that of the chains it touches, not of the
    host's whole firewall. None: unknown, every chain is rewritten, and chains of ours that
    ``present`` holds but ``chains`` does not are deleted. Empty when nothing changes.
    ``bridged_set``: the set exists, so the ``fast_path`` naming it is checked with the jumps.
    """
    if previous is None:
        changed = dict(chains)
        held = [c for _, (_, cs) in ours(present or {}, names).items() for c in cs]
        gone = [c for c in held if c not in chains]
    else:
        # (Identity first: a network's chains are the same lists while it is unchanged.)
        changed = {c: r for c, r in chains.items() if (p := previous.get(c)) is not r and p != r}
        gone = [c for c in previous if c not in chains]
    # A chain already there that changed a little is edited in place (a port among a
    # thousand is one line deleted or inserted), a new one or one changed a lot rewritten.
    edits = {} if previous is None else _edits(changed, previous)
    # The jumps (and the fast path) the kernel must hold, checked against ``present``.
    wanted = list(jumps(names, version)) if present is not None else []
    if present is not None and bridged_set and (fast := fast_path(names, version, present)):
        wanted.append((FILTER, DOCKER_USER, *fast))
    # Each chain's table, looked up once (a first apply declares thousands of chains).
    where = {c: table_of(names, c) for c in (*changed, *gone)}
    out: list[str] = []
    for table in tables(names):
        declare = [c for c in changed if where[c] == table and c not in edits]
        edit = [line for c in changed if where[c] == table for line in edits.get(c, [])]
        delete = [c for c in gone if where[c] == table]
        extra: list[str] = []
        if present is not None:
            for t, chain, position, match in wanted:
                if t == table and not has_rule(present, table, chain, match):
                    extra.append(f"{position} {match}")
            extra.extend(old_layout(present, table, names))
        if previous is not None and not (declare or delete or extra or edit):
            continue
        out.append(f"*{table}")
        out.extend(f":{c} - [0:0]" for c in (*declare, *delete))
        for c in declare:
            out.extend(chains[c])
        out.extend(edit)
        # Whatever jumped to a deleted chain was declared above (its text changed).
        out.extend(f"-X {c}" for c in delete)
        out.extend(extra)
        out.append("COMMIT")
    if not out:
        return ""
    text = "\n".join(out) + "\n"
    for line in text.splitlines():
        # Defence in depth: every value we render is validated upstream, but a rule line must
        # never smuggle a newline, NUL or a second table into iptables-restore.
        if "\x00" in line or "\r" in line:
            raise KernelError(f"refusing to load a firewall rule with control characters: {line!r}")
    return text


def _edits(changed: dict[str, list[str]], previous: dict[str, list[str]]) -> dict[str, list[str]]:
    out = {}
    for c, new in changed.items():
        if c in previous and (lines := _edit(c, previous[c], new)) is not None:
            out[c] = lines
    return out


def _edit(chain: str, old: list[str], new: list[str]) -> list[str] | None:
    """``-D``/``-I``/``-A`` lines taking ``chain`` from ``old`` to ``new`` by position, or None
    when rewriting the chain whole is as short. Edits run from the end of the chain, so the
    positions of those before stay valid."""
    # What both share at either end is skipped before diffing: a change is mostly one port
    # among a thousand rules, and difflib on the whole chain cost more than the change.
    start, stop = 0, min(len(old), len(new))
    while start < stop and old[start] == new[start]:
        start += 1
    tail = 0
    while tail < stop - start and old[-1 - tail] == new[-1 - tail]:
        tail += 1
    matcher = difflib.SequenceMatcher(
        a=old[start : len(old) - tail], b=new[start : len(new) - tail], autojunk=False
    )
    ops = [
        (tag, i1 + start, i2 + start, j1 + start, j2 + start)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes()
        if tag != "equal"
    ]
    if sum((i2 - i1) + (j2 - j1) for _, i1, i2, j1, j2 in ops) * 2 > len(new):
        return None
    head = f"-A {chain} "
    out: list[str] = []
    length = len(old)
    for _, i1, i2, j1, j2 in reversed(ops):
        out.extend(f"-D {chain} {i1 + 1}" for _ in range(i2 - i1))
        length -= i2 - i1
        for k, rule in enumerate(new[j1:j2]):
            body = rule[len(head) :]
            if i1 + k == length:
                out.append(f"-A {chain} {body}")
            else:
                out.append(f"-I {chain} {i1 + k + 1} {body}")
            length += 1
    return out


def old_layout(present: Saved, table: str, names: Names) -> list[str]:
    """Lines removing our chains from a table they no longer live in (the isolation chains
    were in filter before they moved to mangle), with the jumps into them."""
    table_of = {c: t for t, chains in tables(names).items() for c in chains}
    stale = [
        c
        for c in names.all_chains()
        if table_of[c] != table and any(r.startswith(f":{c} ") for r in present.get(table, []))
    ]
    jumps_in = [
        r.replace("-A ", "-D ", 1)
        for r in present.get(table, [])
        if r.startswith("-A ")
        and any(r.endswith(f"-j {c}") for c in stale)
        and not any(r.startswith(f"-A {c} ") for c in stale)
    ]
    return [*jumps_in, *(f"-F {c}" for c in stale), *(f"-X {c}" for c in stale)]


def differences(
    plan: FirewallPlan,
    version: int,
    names: Names,
    present: Saved,
    *,
    docker_isolation: bool,
    bridged_set: bool = False,
) -> list[str]:
    """What applying ``plan`` would change in one family, one line each."""
    out: list[str] = []
    tag = f"IPv{version}"
    rendered = render(
        plan, version, names, docker_isolation=docker_isolation, bridged_set=bridged_set
    )
    by_chain: dict[tuple[str, str], list[str]] = {}
    for table, lines in present.items():
        for r in lines:
            if r.startswith("-A "):
                by_chain.setdefault((table, r.split(" ", 2)[1]), []).append(r)
    for chain, want in rendered.items():
        have = by_chain.get((table_of(names, chain), chain), [])
        want_norm = [normalize(r) for r in want]
        have_norm = [normalize(r) for r in have]
        want_set, have_set = set(want_norm), set(have_norm)
        out.extend(f"{tag} missing rule: {r}" for r in want_norm if r not in have_set)
        out.extend(f"{tag} unexpected rule: {r}" for r in have_norm if r not in want_set)
    for table, chain, _, match in jumps(names, version):
        if not has_rule(present, table, chain, match):
            out.append(f"{tag} missing jump in {table}/{chain} to our chain")
    fast = fast_path(names, version, present) if bridged_set else None
    if fast and not has_rule(present, FILTER, DOCKER_USER, fast[1]):
        out.append(f"{tag} missing accept of traffic inside our bridges in {FILTER}/{DOCKER_USER}")
    for table, (_, held) in ours(present, names).items():
        out.extend(f"{tag} unexpected chain {table}/{c}" for c in held if c not in rendered)
    for table in tables(names):
        if stale := old_layout(present, table, names):
            out.append(f"{tag} our chains in the wrong table ({table}): " + "; ".join(stale))
    return out


def ours(present: Saved, names: Names) -> dict[str, tuple[list[str], list[str]]]:
    """Table -> (our jumps in built-in chains, our chains), as iptables-save lists them."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for table in tables(names):
        lines = present.get(table, [])
        jumps_in = [
            r
            for r in lines
            if r.startswith("-A ")
            and (f'--comment "{names.comment}"' in r or f"--comment {names.comment}" in r)
        ]
        declared = [r[1:].split(" ", 1)[0] for r in lines if r.startswith(":")]
        chains = [c for c in names.all_chains() if c in declared]
        chains += [c for c in declared if names.is_net_chain(c) and table_of(names, c) == table]
        out[table] = (jumps_in, chains)
    return out


def removal_input(present: Saved, names: Names) -> str:
    """``iptables-restore --noflush`` input removing every jump and chain of ours."""
    lines: list[str] = []
    for table, (jumps_in, chains) in ours(present, names).items():
        lines.append(f"*{table}")
        lines.extend(r.replace("-A ", "-D ", 1) for r in jumps_in)
        lines.extend(f":{c} - [0:0]" for c in chains)
        lines.extend(f"-X {c}" for c in chains)
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"
