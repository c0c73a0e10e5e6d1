"""Write README.md from nbs/index.ipynb (nbconvert's markdown exporter: nbdev-readme needs Quarto); `--check` only
compares."""

import sys
from pathlib import Path

from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parents[1]


def rendered() -> str:
    "The README that nbs/index.ipynb describes."
    body, _ = MarkdownExporter().from_filename(str(ROOT / 'nbs' / 'index.ipynb'))
    return body.rstrip('\n') + '\n'


if __name__ == '__main__':
    readme, text = ROOT / 'README.md', rendered()
    if '--check' not in sys.argv[1:]:
        readme.write_text(text)
    elif readme.read_text() != text:
        sys.exit("README.md differs from nbs/index.ipynb: edit the notebook, then run `python .ci/readme.py`")
