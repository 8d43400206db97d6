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
