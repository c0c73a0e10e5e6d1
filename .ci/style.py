"""Checks ruff cannot make on the exported package: every module is what `ruff format` makes of it but for the layout
nbdev writes (its `__all__` list, one blank line between cells); no function longer than 60 lines; no line over 120
characters except the first line of nbdev's `__all__` (nbdev wraps the list at 120 without counting `__all__ = `)."""

import ast, difflib, re, subprocess, sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'fh_saas'
MAX_FUNCTION, MAX_LINE = 60, 120


def _code_lines(text: str) -> list[str]:
    "`text` without nbdev's `__all__` list and without blank lines: what ruff's layout and nbdev's may differ in."
    text = re.sub(r"^__all__ = \[.*?\]\n", "", text, flags=re.S | re.M)
    return [line for line in text.splitlines() if line.strip()]


def unformatted(path: Path) -> list[str]:
    "The first lines `ruff format` would change in `path`, beyond nbdev's layout."
    text = path.read_text()
    ruff = [sys.executable, '-m', 'ruff', 'format', '--stdin-filename', str(path), '-']
    formatted = subprocess.run(ruff, input=text, capture_output=True, text=True, check=True).stdout
    diff = difflib.unified_diff(_code_lines(text), _code_lines(formatted), lineterm='', n=0)
    return [line for line in diff if not line.startswith(('---', '+++', '@@'))][:6]


def problems() -> list[str]:
    out = []
    for path in sorted(PACKAGE.glob('*.py')):
        if path.name == '_modidx.py':
            continue
        text, name = path.read_text(), path.relative_to(PACKAGE.parent)
        for n, line in enumerate(text.splitlines(), 1):
            if len(line) > MAX_LINE and not line.startswith('__all__ = ['):
                out.append(f"{name}:{n}: {len(line)} characters (at most {MAX_LINE})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (size := node.end_lineno - node.lineno + 1) > MAX_FUNCTION:
                    out.append(f"{name}:{node.lineno}: {node.name} is {size} lines (at most {MAX_FUNCTION}): split it")
        if changes := unformatted(path):
            out.append(f"{name}: not as `ruff format` writes it (run `ruff format nbs`, then nbdev-export):")
            out += [f"    {line}" for line in changes]
    return out


if __name__ == '__main__':
    if found := problems():
        sys.exit('\n'.join(found))
    print(
        f"fh_saas: formatted by ruff, functions of at most {MAX_FUNCTION} lines, lines of at most {MAX_LINE} characters"
    )
