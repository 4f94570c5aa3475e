"""Print the code-health counts issue 25 tracks, over the packages below the entry points.

    python scripts/code_counts.py          # a table
    python scripts/code_counts.py --list   # and every in-function import / loose parameter, by place

- in-function imports: ``import`` statements inside a function body (a deferred import must say
  why on its line: ``# deferred: <reason>``; those are counted apart)
- loose parameters: function parameters annotated as a loose dict (``dict``, ``dict[str, Any]``,
  ``Mapping[str, Any]``, ``MutableMapping``) or an OmegaConf ``DictConfig``
- files over 500 lines
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nextgpt", "datamodules", "callbacks")
LOOSE = re.compile(
    r"^(DictConfig|dict|Dict|dict\[str, ?Any\]|Mapping\[str, ?Any\]|MutableMapping\[str, ?Any\])( \| None)?$"
)


def files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def scan(path: Path) -> tuple[list[str], list[str], list[str]]:
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    inner, deferred, loose = [], [], []
    rel = path.relative_to(ROOT)
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import | ast.ImportFrom):
                where = f"{rel}:{node.lineno}"
                (deferred if "# deferred:" in lines[node.lineno - 1] else inner).append(where)
        args = fn.args
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            if a.annotation is not None and LOOSE.match(ast.unparse(a.annotation)):
                loose.append(f"{rel}:{a.lineno} {fn.name}({a.arg}: {ast.unparse(a.annotation)})")
    # an import nested in two functions is walked twice
    return sorted(set(inner)), sorted(set(deferred)), loose


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--list", action="store_true", help="list every finding")
    args = parser.parse_args()
    inner, deferred, loose, long = [], [], [], []
    for path in files():
        i, d, lo = scan(path)
        inner += i
        deferred += d
        loose += lo
        n = len(path.read_text().splitlines())
        if n > 500:
            long.append(f"{path.relative_to(ROOT)} ({n} lines)")
    print(f"packages: {', '.join(PACKAGES)} ({len(files())} files)")
    print(f"in-function imports without a stated reason: {len(inner)}")
    print(f"deferred imports with a stated reason:       {len(deferred)}")
    print(f"parameters typed as a loose dict/DictConfig: {len(loose)}")
    print(f"files over 500 lines:                        {len(long)} {', '.join(long)}")
    if args.list:
        for title, items in (("in-function imports", inner), ("loose parameters", loose)):
            print(f"\n{title}:")
            print("\n".join(f"  {x}" for x in items))


if __name__ == "__main__":
    main()
