"""Every command the README shows is run here, and its output compared with what the README shows.

Numbers are compared with a tolerance (10 % relative, or 1 on integer
percentages), so a last-digit difference between CPUs cannot fail the suite;
every word, name, flag kind and exit code must match exactly.
"""

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from actstats.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:e[-+]?\d+)?")
EXIT_CODES = {"--fail-on symmetric": 1}


def console_examples() -> list[tuple[str, str]]:
    """(command, expected output) for every `$ actstats ...` line in a console block."""
    examples = []
    for block in re.findall(r"```console\n(.*?)```", README, flags=re.S):
        command, output = None, []
        for line in block.splitlines():
            if line.startswith("$ "):
                if command is not None:
                    examples.append((command, "\n".join(output)))
                command, output = line[2:], []
            else:
                output.append(line)
        if command is not None:
            examples.append((command, "\n".join(output)))
    return examples


def tokens(text: str) -> list[str]:
    return text.split()


def same_token(a: str, b: str) -> bool:
    if a == b:
        return True
    numbers_a, numbers_b = NUMBER.findall(a), NUMBER.findall(b)
    if NUMBER.sub("#", a) != NUMBER.sub("#", b) or len(numbers_a) != len(numbers_b):
        return False
    for x, y in zip(numbers_a, numbers_b):
        fx, fy = float(x), float(y)
        if abs(fx - fy) <= 0.1 * max(abs(fx), abs(fy)) + 1e-12:
            continue
        if x.lstrip("-").isdigit() and y.lstrip("-").isdigit() and abs(fx - fy) <= 1:
            continue
        return False
    return True


EXAMPLES = console_examples()


def test_the_readme_shows_commands():
    commands = [command for command, _ in EXAMPLES]
    assert "actstats probe examples/cifar_net.py:build --input-shape 3,32,32" in commands
    assert any(c.startswith("actstats compare examples/mobilenet_v2.py:build") for c in commands)
    assert {"actstats --help", "actstats probe --help", "actstats compare --help", "actstats plot --help"} <= set(commands)


@pytest.mark.parametrize(("command", "expected"), EXAMPLES, ids=[c for c, _ in EXAMPLES])
def test_readme_command_output_is_real(command, expected, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = shlex.split(command)
    assert args[0] == "actstats"
    result = CliRunner().invoke(cli, args[1:], terminal_width=80)
    code = next((c for option, c in EXIT_CODES.items() if option in command), 0)
    assert result.exit_code == code, result.output
    got, want = tokens(result.stdout), tokens(expected)
    assert len(got) == len(want), f"{command}\n--- got ---\n{result.stdout}"
    mismatches = [(g, w) for g, w in zip(got, want) if not same_token(g, w)]
    assert not mismatches, f"{command}: {mismatches[:5]}\n--- got ---\n{result.stdout}"


def test_the_picture_command_makes_a_png(tmp_path, monkeypatch):
    # The bash block of "The signal-propagation picture", writing into tmp_path instead of docs/.
    monkeypatch.chdir(ROOT)
    runner = CliRunner()
    report = tmp_path / "deep_mlp_compare.json"
    result = runner.invoke(cli, ["compare", "examples/deep_mlp.py:build", "--inits", "default,xavier,kaiming",
                                 "--json", str(report)])
    assert result.exit_code == 0, result.output
    picture = tmp_path / "spp.png"
    result = runner.invoke(cli, ["plot", str(report), "-o", str(picture)])
    assert result.exit_code == 0, result.output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "actstats compare examples/deep_mlp.py:build --inits default,xavier,kaiming --json " \
           "deep_mlp_compare.json\nactstats plot deep_mlp_compare.json -o docs/spp.png" in README
    assert (ROOT / "docs" / "spp.png").stat().st_size < 150_000


def test_setup_commands_match_ci():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    assert "pip install -e . && actstats probe examples/cifar_net.py:build --input-shape 3,32,32" in first_block
    test_command = "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q"
    assert test_command in first_block
    assert test_command in (ROOT / ".ci" / "run").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_python_api_block_runs():
    block = next(b for b in python_blocks() if "actstats.probe(model" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["result"].best in {"default", "xavier", "kaiming"}
    assert namespace["report"].init == "lsuv"


def test_the_watch_loop_block_runs(tmp_path, monkeypatch):
    import torch
    from torch import nn

    block = next(b for b in python_blocks() if "actstats.watch(model" in b)
    monkeypatch.chdir(tmp_path)  # it writes runs/exp
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    namespace = {
        "model": model,
        "loader": [(torch.randn(16, 4), torch.randn(16, 1)) for _ in range(3)],
        "loss_fn": nn.functional.mse_loss,
        "opt": torch.optim.SGD(model.parameters(), lr=0.01),
    }
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["w"].report() is not None  # step 0 was sampled
    assert (tmp_path / "runs" / "exp").is_dir()
