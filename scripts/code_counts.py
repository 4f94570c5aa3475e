"""Print the code-health counts issue 25 tracks, over the packages below the entry points.

    python scripts/code_counts.py          # a table
    python scripts/code_counts.py --list   # and every in-function import / loose parameter, by place

- in-function imports: ``import`` statements inside a function body (a deferred import must say
  why on its line: ``# deferred: <reason>``; those are counted apart)
- loose parameters: function parameters annotated as a loose dict (``dict``, ``dict[str, Any]``,
  ``Mapping[str, Any]``, ``MutableMapping``) or an OmegaConf ``DictConfig``, alone or in a union
  (``ModelSpec | Mapping[str, Any]`` counts), and config-named parameters (``cfg``, ``config``,
  ``*_cfg``) left unannotated or typed ``Any``. Counted apart, as the boundary: the entry layer
  ``nextgpt/cli/`` (where Hydra's composed config is handled), the functions that turn the composed
  config into the typed specs (:data:`BOUNDARY`), and the spec modules (:data:`SPEC_MODULES`), whose
  parsers take config nodes typed ``Any`` (every such parameter there is counted)
- files over 500 lines
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nextgpt", "datamodules", "callbacks")
CONFIG_NAME = re.compile(r"^(cfg|config|\w+_cfg)$")
# the functions whose job is to read the composed config: validate it, or turn it into a spec
BOUNDARY = {
    ("nextgpt/schema.py", "validate"),
    ("nextgpt/spec.py", "run_spec"),
    ("nextgpt/spec.py", "batch_plan"),
    ("nextgpt/evaluation/spec.py", "eval_spec"),
    ("nextgpt/plan/__init__.py", "of"),  # PlanSettings.of: the ``plan`` node
}
# the modules that turn config nodes into frozen specs: their parsers take the nodes as ``Any``
SPEC_MODULES = {"nextgpt/spec.py", "nextgpt/model_spec.py", "nextgpt/evaluation/spec.py"}
LOOSE = re.compile(
    r"^(DictConfig|dict|Dict|dict\[str, ?Any\]|Mapping\[str, ?Any\]|MutableMapping\[str, ?Any\])$"
)


def files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def is_loose(arg: ast.arg, in_spec_module: bool) -> bool:
    if arg.annotation is None or ast.unparse(arg.annotation) in ("Any", "Any | None"):
        return in_spec_module and arg.annotation is not None or bool(CONFIG_NAME.match(arg.arg))
    return any(LOOSE.match(part.strip()) for part in ast.unparse(arg.annotation).split("|"))


def at_boundary(rel: Path, fn: str) -> bool:
    return (
        rel.parts[:2] == ("nextgpt", "cli")
        or (rel.as_posix(), fn) in BOUNDARY
        or rel.as_posix() in SPEC_MODULES
    )


def scan(path: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    inner, deferred, loose, boundary = [], [], [], []
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
            if is_loose(a, rel.as_posix() in SPEC_MODULES):
                note = ast.unparse(a.annotation) if a.annotation is not None else "unannotated"
                where = boundary if at_boundary(rel, fn.name) else loose
                where.append(f"{rel}:{a.lineno} {fn.name}({a.arg}: {note})")
    # an import nested in two functions is walked twice
    return sorted(set(inner)), sorted(set(deferred)), loose, boundary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--list", action="store_true", help="list every finding")
    args = parser.parse_args()
    inner, deferred, loose, boundary, long = [], [], [], [], []
    for path in files():
        i, d, lo, b = scan(path)
        inner += i
        deferred += d
        loose += lo
        boundary += b
        n = len(path.read_text().splitlines())
        if n > 500:
            long.append(f"{path.relative_to(ROOT)} ({n} lines)")
    print(f"packages: {', '.join(PACKAGES)} ({len(files())} files)")
    print(f"in-function imports without a stated reason: {len(inner)}")
    print(f"deferred imports with a stated reason:       {len(deferred)}")
    print(f"parameters typed as a loose dict/DictConfig: {len(loose)}")
    print(f"  the same at the config boundary (cli/, spec): {len(boundary)}")
    print(f"files over 500 lines:                        {len(long)} {', '.join(long)}")
    if args.list:
        for title, items in (
            ("in-function imports", inner),
            ("loose parameters", loose),
            ("loose parameters at the config boundary", boundary),
        ):
            print(f"\n{title}:")
            print("\n".join(f"  {x}" for x in items))


if __name__ == "__main__":
    main()
