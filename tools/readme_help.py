"""Regenerate the `--help` blocks of README.md from the real commands.

Run after changing a command's options: ``python tools/readme_help.py``.
``tests/test_readme.py`` fails while the README and ``--help`` disagree.
"""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from actstats.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> None:
    text = README.read_text()
    runner = CliRunner()

    def replace(match: re.Match[str]) -> str:
        args = match.group(1).split()
        out = runner.invoke(cli, args, terminal_width=80).stdout
        return f"```console\n$ actstats {' '.join(args)}\n{out.rstrip()}\n```"

    text = re.sub(r"```console\n\$ actstats ((?:\w+ )?--help)\n.*?```", replace, text, flags=re.S)
    README.write_text(text)


if __name__ == "__main__":
    main()
