"""The `--variants` language of `segment ablate`: which long skips each trained variant keeps.

Levels are numbered from the finest: level 0 is the full-resolution skip, level depth-2 the coarsest one (a net of
depth D has D - 1 skips). Tokens, separated by commas, none of which needs quoting in a shell:

- `all`, `none`: every skip, no skip;
- `only:1`, `only:0+2`: keep just these levels; `drop:1`, `drop:0+2`: keep every level but these;
- `levels`: the per-level study, `all`, each level dropped alone, each level kept alone, `none`;
- `[0,1]` or `2` (the older list form, same as `only:`); brackets need quotes in zsh.

`drop:` and `levels` depend on the depth, which is known only after planning; `parse_tokens` checks the text
without it (so a typo fails before any planning), `parse_variants(text, depth)` resolves it.
"""

from __future__ import annotations

import re

import yaml

from segment.config import SkipSpec
from segment.errors import ConfigError

Token = tuple[str, list[int]]  # ("all" | "none" | "levels" | "only" | "drop", levels)
_LEVELS = re.compile(r"^(only|keep|drop):(\d+(?:\+\d+)*)$")
HELP = ("comma-separated skip settings (level 0 = finest, full resolution): all, none, only:1 (keep just level 1), "
        "drop:1 (all but level 1), several levels as only:0+2, or 'levels' = all, each level dropped alone, each kept "
        "alone, none")


def _split_outside_brackets(text: str) -> list[str]:
    tokens, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            raise ConfigError(f"--variants {text!r}: ']' without '['")
        if ch == "," and depth == 0:
            tokens.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise ConfigError(f"--variants {text!r}: '[' without ']'")
    return tokens + [current]


def _token(text: str, token: str) -> Token:
    if token in ("all", "none", "levels"):
        return token, []
    match = _LEVELS.match(token)
    if match:
        kind = "only" if match.group(1) == "keep" else match.group(1)
        return kind, sorted({int(v) for v in match.group(2).split("+")})
    value = yaml.safe_load(token) if token else None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return "only", sorted(set(value))
    raise ConfigError(f"--variants {text!r}: {token!r} is not a skip setting; use all, none, levels, only:1, drop:1, "
                      "only:0+2 or a list of levels such as [0,1]")


def parse_tokens(text: str) -> list[Token]:
    """The tokens of `text`, checked for syntax (not yet for the depth)."""
    return [_token(text, t.strip()) for t in _split_outside_brackets(text)]


def _resolve(token: Token, n: int) -> list[SkipSpec]:
    kind, levels = token
    if kind == "levels":
        drop = [[lvl for lvl in range(n) if lvl != i] for i in range(n)]
        return ["all", *drop, *([i] for i in range(n)), "none"]
    if kind in ("all", "none"):
        return [kind]
    bad = [lvl for lvl in levels if not 0 <= lvl < n]
    if bad:
        raise ConfigError(f"--variants {kind}:{'+'.join(map(str, levels))}: level(s) {bad} out of range; this net has "
                          f"{n} skip level(s), 0..{n - 1} (0 = finest)")
    return [levels if kind == "only" else [lvl for lvl in range(n) if lvl not in levels]]


def _normalise(spec: SkipSpec, n: int) -> SkipSpec:
    """A list keeping every level is `all`, an empty one `none` (so equal settings get one name)."""
    if isinstance(spec, list):
        return "all" if spec == list(range(n)) else ("none" if not spec else spec)
    return spec


def kept_count(spec: SkipSpec) -> float:
    return float("inf") if spec == "all" else (0 if spec == "none" else len(spec))


def parse_variants(text: str, depth: int | None = None) -> list[SkipSpec]:
    """'all,none,only:0' -> ['all', [0], 'none'], most skips first (the first variant is the reference).

    `depth` is the number of encoder stages (skip levels 0..depth-2); `drop:` and `levels` need it. Settings that
    come out equal (e.g. `drop:0` and `only:1` at depth 3) are trained once.
    """
    tokens = parse_tokens(text)
    if depth is None and any(kind in ("levels", "drop") for kind, _ in tokens):
        raise ConfigError(f"--variants {text!r}: 'levels' and 'drop:' need the network depth")
    specs: list[SkipSpec] = []
    for token in tokens:
        for spec in _resolve(token, depth - 1 if depth is not None else 10**6):
            spec = _normalise(spec, depth - 1) if depth is not None else (spec or "none")
            if spec not in specs:
                specs.append(spec)
    if len(specs) < 2:
        raise ConfigError(f"--variants {text!r}: need at least two different skip settings, e.g. all,none")
    return sorted(specs, key=lambda s: -kept_count(s))


def variant_name(spec: SkipSpec) -> str:
    """Folder-safe name: skips-all, skips-none, skips-0-1."""
    return "skips-" + (spec if isinstance(spec, str) else "-".join(str(v) for v in spec) or "none")


def kept_levels(spec: SkipSpec, n_levels: int) -> list[int]:
    return list(range(n_levels)) if spec == "all" else ([] if spec == "none" else list(spec))


def describe(spec: SkipSpec, n_levels: int) -> str:
    """Words for a setting, e.g. 'all but level 1', 'only level 0 (= all but level 1)'."""
    kept = kept_levels(spec, n_levels)
    if len(kept) == n_levels:
        return "all levels"
    if not kept:
        return "no skips"
    dropped = [lvl for lvl in range(n_levels) if lvl not in kept]
    words = []
    if len(kept) == 1:
        words.append(f"only level {kept[0]}")
    if len(dropped) == 1:
        words.append(f"all but level {dropped[0]}")
    if not words:
        words.append("levels " + ", ".join(map(str, kept)))
    return words[0] + (f" (= {words[1]})" if len(words) > 1 else "")


def dropped_alone(spec: SkipSpec, n_levels: int) -> int | None:
    """The one level this setting drops, when it keeps every other level; else None."""
    kept = kept_levels(spec, n_levels)
    missing = [lvl for lvl in range(n_levels) if lvl not in kept]
    return missing[0] if len(missing) == 1 and n_levels > 1 else None


def parse_seeds(text: str | None, default: int) -> list[int]:
    """'0,1' -> [0, 1]; None -> [default]."""
    if text is None:
        return [default]
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected one or more different integers, e.g. 0,1")
    return seeds
