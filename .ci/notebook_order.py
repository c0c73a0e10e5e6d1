"Check that the notebooks are numbered in import order: each one imports only modules of lower-numbered notebooks."

import json, re, sys
from pathlib import Path

NBS = Path(__file__).resolve().parents[1] / 'nbs'
IMPORT = re.compile(r'^\s*(?:from fh_saas\.(\w+) import|from fh_saas import ([\w, ()]+)|import fh_saas\.(\w+))', re.M)


def notebooks() -> dict[str, tuple[str, Path]]:
    "Module name -> (notebook number, path) for every numbered notebook that exports a module."
    found = {}
    for p in sorted(NBS.glob('[0-9]*.ipynb')):
        cells = json.loads(p.read_text())['cells']
        text = '\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'code')
        if m := re.search(r'^#\| default_exp (\w+)', text, re.M):
            found[m.group(1)] = (p.name.split('_')[0], p, text)
    return found


def problems() -> list[str]:
    found, out = notebooks(), []
    numbers = [n for n, _, _ in found.values()]
    out += [f"two notebooks are numbered {n}" for n in sorted({n for n in numbers if numbers.count(n) > 1})]
    for mod, (num, path, text) in found.items():
        for m in IMPORT.finditer(text):
            names = [m.group(1) or m.group(3)] if m.group(2) is None else re.findall(r'\w+', m.group(2))
            for dep in names:
                if dep in found and dep != mod and found[dep][0] >= num:
                    out.append(
                        f"{path.name} imports fh_saas.{dep}, "
                        f"whose notebook {found[dep][1].name} does not come before it"
                    )
    return out


if __name__ == '__main__':
    if found := problems():
        print('\n'.join(dict.fromkeys(found)), file=sys.stderr)
        sys.exit(1)
    print(f"{len(notebooks())} notebooks, each importing only lower-numbered ones")
