#!/usr/bin/env python3
"""Write each role's README variable table from the role's own files.

    scripts/role-docs.py            rewrite every roles/*/README.md table
    scripts/role-docs.py --check    change nothing; exit 1 naming what is out of date

A role variable is written down once: its default in defaults/main.yml (the
only place a default lives: meta/argument_specs.yml gives no `default:`), its
type and description in meta/argument_specs.yml. The README table between
`<!-- defaults:start -->` and `<!-- defaults:end -->` is made from the two, one
row per spec option in spec order, so it cannot drift from either.
tests/test_role_defaults.py runs the check for every role.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
START = "<!-- defaults:start -->"
END = "<!-- defaults:end -->"
ANSIBLE_DOC_MARKUP = re.compile(r"\b[OVC]\(([^)]*)\)")
LONG_DEFAULT = 160  # characters of a flow-style default shown in a table cell
HEADER = "| Variable | Default | Meaning |\n|---|---|---|\n"


class RoleDocsError(Exception):
    """A role README the table cannot be written into (missing, or without its markers)."""


def _load(path: Path) -> dict:
    if not path.exists():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def role_defaults(role: Path) -> dict:
    return _load(role / "defaults" / "main.yml")


def role_options(role: Path) -> dict:
    spec = _load(role / "meta" / "argument_specs.yml")
    return (spec.get("argument_specs") or {}).get("main", {}).get("options") or {}


def problems(role: Path) -> list[str]:
    """Every break of the rule between defaults/main.yml and the argument spec."""
    defaults, options = role_defaults(role), role_options(role)
    found = []
    if not (role / "meta" / "argument_specs.yml").exists():
        found.append(f"{role.name}: no meta/argument_specs.yml")
    for name in defaults:
        if name not in options:
            found.append(
                f"{role.name}: {name} is in defaults/main.yml but not in the argument spec"
            )
    for name, option in options.items():
        if "default" in option:
            found.append(
                f"{role.name}: the argument spec gives {name} a default; "
                "defaults/main.yml is the only place for it"
            )
        required = bool(option.get("required"))
        if name in defaults and required:
            found.append(f"{role.name}: {name} is required but has a default in defaults/main.yml")
        if name not in defaults and not required:
            found.append(
                f"{role.name}: {name} has no default in defaults/main.yml and is not required"
            )
    return found


def code(text: str) -> str:
    """TEXT as a code span in a table cell: a `|` escaped (GFM splits cells on
    it even inside code), backticks fenced by a longer run."""
    text = text.replace("|", "\\|")
    if "`" in text:
        return f"`` {text} ``"
    return f"`{text}`"


def default_cell(value: object) -> str:
    if isinstance(value, str):
        return code(value) if value else '`""`'
    if isinstance(value, bool) or value is None:
        return code(yaml.safe_dump(value).splitlines()[0])
    if isinstance(value, int | float):
        return code(str(value))
    flow = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9).strip()
    # A long list or mapping (a dashboard's graphs) is unreadable in one cell:
    # the table points at the one place it is written instead.
    if len(flow) > LONG_DEFAULT:
        return "see `defaults/main.yml`"
    return code(flow)


def description_cell(option: dict) -> str:
    """The spec's description, then its choices and the keys of each element."""
    text = option.get("description", "")
    if isinstance(text, list):
        text = " ".join(text)
    # ansible-doc markup O(option), V(value), C(code) becomes code spans; in
    # plain text `<` is escaped so GitHub does not take <name> for an HTML tag
    # and `|` so it does not split the cell.
    parts = ANSIBLE_DOC_MARKUP.split(" ".join(str(text).split()))
    cell = "".join(
        code(part) if odd else part.replace("<", "\\<").replace("|", "\\|")
        for odd, part in zip(itertools.cycle((False, True)), parts, strict=False)
    )
    if option.get("choices"):
        cell += " One of " + ", ".join(code(str(choice)) for choice in option["choices"]) + "."
    if option.get("options"):
        cell += " Keys: " + ", ".join(code(key) for key in option["options"]) + "."
    return cell


def table(role: Path) -> str:
    defaults, options = role_defaults(role), role_options(role)
    rows = []
    for name, option in options.items():
        default = default_cell(defaults[name]) if name in defaults else "required"
        rows.append(f"| `{name}` | {default} | {description_cell(option)} |\n")
    return HEADER + "".join(rows)


def readme_text(role: Path) -> str:
    """The role's README with its table made anew."""
    readme = role / "README.md"
    if not readme.exists():
        raise RoleDocsError(f"{role.name}: no README.md")
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise RoleDocsError(f"{readme}: needs one {START} line, then one {END} line")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    return f"{before}{START}\n{table(role)}{END}{after}"


def roles(root: Path = ROOT) -> list[Path]:
    return sorted(path for path in (root / "roles").iterdir() if (path / "tasks").is_dir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 on drift")
    parser.add_argument("roles", nargs="*", type=Path, help="role directories (default: all)")
    args = parser.parse_args(argv)
    failed = False
    for role in args.roles or roles():
        try:
            for problem in problems(role):
                print(problem, file=sys.stderr)
                failed = True
            text = readme_text(role)
        except (RoleDocsError, yaml.YAMLError) as exc:
            print(f"role-docs: {exc}", file=sys.stderr)
            failed = True
            continue
        readme = role / "README.md"
        if text == readme.read_text():
            continue
        if args.check:
            print(f"{readme}: table out of date (run scripts/role-docs.py)", file=sys.stderr)
            failed = True
        else:
            readme.write_text(text)
            print(f"wrote {readme}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
