import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_generated_from_index():
    res = subprocess.run([sys.executable, str(ROOT / ".ci" / "make_readme.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_readme_names_the_two_commands_and_ci_calls_the_test_command():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def python_blocks(text: str) -> list[str]:
    "The ```python code blocks of a Markdown text, in order."
    import re
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_python_block_of_the_readme_runs(tmp_path):
    "The README's examples are executed in order, in one fresh interpreter: they can never break silently."
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert blocks, "README.md has no python examples"
    script = tmp_path / "readme_examples.py"
    script.write_text("\n\n".join(blocks))
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, f"A README example failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
