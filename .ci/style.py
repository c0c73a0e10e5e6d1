"""Checks ruff cannot make on the exported package: no function longer than 60 lines, and no line over 120 characters
except the first line of nbdev's `__all__` (nbdev wraps the list at 120 without counting `__all__ = `)."""
import ast, sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'fh_saas'
MAX_FUNCTION, MAX_LINE = 60, 120


def problems() -> list[str]:
    out = []
    for path in sorted(PACKAGE.glob('*.py')):
        if path.name == '_modidx.py': continue
        text, name = path.read_text(), path.relative_to(PACKAGE.parent)
        for n, line in enumerate(text.splitlines(), 1):
            if len(line) > MAX_LINE and not line.startswith('__all__ = ['):
                out.append(f"{name}:{n}: {len(line)} characters (at most {MAX_LINE})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (size := node.end_lineno - node.lineno + 1) > MAX_FUNCTION:
                    out.append(f"{name}:{node.lineno}: {node.name} is {size} lines (at most {MAX_FUNCTION}): split it")
    return out


if __name__ == '__main__':
    if found := problems(): sys.exit('\n'.join(found))
    print(f"fh_saas: every function at most {MAX_FUNCTION} lines, every line at most {MAX_LINE} characters")
