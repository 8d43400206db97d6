"""README.md from nbs/index.ipynb (what `nbdev_readme` does, without Quarto).

Hidden cells (`#| hide`) are dropped, nbdev directive lines removed, the rest converted to Markdown.
Used by `make readme`; tests/test_readme.py checks that README.md is up to date.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render(nb_path: Path) -> str:
    cells = json.loads(nb_path.read_text())["cells"]
    parts = []
    for cell in cells:
        src = "".join(cell["source"]).strip("\n")
        lines = src.splitlines()
        if any(l.strip().replace(" ", "") in ("#|hide", "#|exporti", "#|export") for l in lines):
            continue
        if cell["cell_type"] == "markdown":
            parts.append(src)
        elif cell["cell_type"] == "code":
            code = "\n".join(l for l in lines if not l.lstrip().startswith("#|")).strip("\n")
            if code:
                parts.append(f"```python\n{code}\n```")
    return "\n\n".join(parts).strip() + "\n"


if __name__ == "__main__":
    text = render(ROOT / "nbs" / "index.ipynb")
    out = ROOT / "README.md"
    if "--check" in sys.argv:
        sys.exit(0 if out.exists() and out.read_text() == text else
                 "README.md is out of date with nbs/index.ipynb: run `make readme` and commit.")
    out.write_text(text)
