"""The command line through click's CliRunner: exit codes, stdout, one-line errors on stderr."""

import json
import sys
import textwrap

import pytest
from click.testing import CliRunner

from actstats.cli import cli
from tests.test_report import validate_report

CIFAR = "examples/cifar_net.py:build"


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_probe_prints_the_table():
    result = run("probe", CIFAR, "--input-shape", "3,32,32", "--batch-size", "4", "--batches", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Net on cpu: 2 batch(es) of 4, input (4, 3, 32, 32)")
    names = [line.split()[1] for line in lines[2:13]]
    assert names == ["conv1", "relu()", "pool", "conv2", "relu()#1", "pool#1", "fc1", "relu()#2", "fc2",
                     "relu()#3", "fc3"]
    # PyTorch's default init shrinks the signal through the ReLU layers (0.41x He each).
    assert lines[13].startswith("flags: V vanishing")
    assert any(line.startswith("vanishing: ") for line in lines[14:])
    assert result.stderr == ""


def test_probe_json_validates_and_matches_the_file(tmp_path):
    path = tmp_path / "report.json"
    result = run("probe", CIFAR, "--input-shape", "3,32,32", "--batch-size", "4", "--batches", "2",
                 "--format", "json", "--json", str(path))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    validate_report(doc)
    assert json.loads(path.read_text()) == doc
    assert doc["input"]["shape"] == [4, 3, 32, 32] and doc["batches"] == 2


def test_probe_csv_and_no_backward():
    result = run("probe", CIFAR, "--input-shape", "3,32,32", "--batch-size", "2", "--batches", "1",
                 "--format", "csv", "--no-backward", "--eval")
    assert result.exit_code == 0, result.output
    rows = result.stdout.splitlines()
    assert len(rows) == 1 + 11 and rows[0].startswith("name,type,index,act.mean")
    assert ",,,," in rows[1]  # grad columns are empty without backward


def test_example_inputs_and_dict_inputs():
    result = run("probe", "examples/transformer.py:build", "--batches", "2", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert any(l["name"].endswith("relu()") or l["type"] == "F.relu" for l in doc["layers"])


def test_inputs_function_and_package_module_spec(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            return nn.Sequential(nn.Linear(3, 5), nn.Tanh())

        def batch(n):
            return torch.ones(n, 3)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run("probe", "mymodels:build", "--inputs", f"{tmp_path / 'mymodels.py'}:batch",
                 "--batch-size", "3", "--batches", "1", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["input"] == {"shape": [3, 3], "rms": 1.0, "nonfinite": 0}
    assert [l["name"] for l in doc["layers"]] == ["0", "1"]
    sys.modules.pop("mymodels", None)


def test_long_inputs_need_a_vocabulary():
    result = run("probe", "examples/lstm_text.py:build", "--input-shape", "7", "--input-dtype", "long")
    assert result.exit_code == 2
    assert result.stderr == "actstats: error: --input-dtype long needs --vocab-size N (token ids are drawn from [0, N))\n"
    result = run("probe", "examples/lstm_text.py:build", "--input-shape", "7", "--input-dtype", "long",
                 "--vocab-size", "50", "--batches", "1", "--batch-size", "2")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [(["missing.py:build"], "model file 'missing.py' does not exist"),
     (["examples/cifar_net.py:bulid"], "'examples/cifar_net.py' has no callable 'bulid'; callables defined there: Net, build, build_with_inputs (did you mean 'build'?)"),
     (["examples/cifar_net.py"], "MODEL_SPEC 'examples/cifar_net.py' is not of the form path/to/file.py:callable or package.module:callable"),
     ([CIFAR], "'examples/cifar_net.py:build' returned a model without example inputs; pass --input-shape (per sample, e.g. 3,32,32) or --inputs file.py:fn"),
     ([CIFAR, "--input-shape", "3,x"], "--input-shape '3,x' is not a list of positive integers; expected e.g. 3,224,224"),
     ([CIFAR, "--input-shape", "3,28,28"], "forward failed in layer 'fc1' (Linear, in_features=400, out_features=120, bias=True) on an input of shape (32, 256): mat1 and mat2 shapes cannot be multiplied (32x256 and 400x120)"),
     (["no_such_package.models:build"], "module 'no_such_package.models' cannot be found (No module named 'no_such_package'); give a file path ending in .py or an importable module"),
     ([CIFAR, "--input-shape", "3,32,32", "--device", "cuda:0"], None)],
    ids=["missing-file", "missing-callable", "no-colon", "no-inputs", "bad-shape", "forward-fails", "missing-module", "no-cuda"],
)
def test_bad_input_is_one_sentence_and_exit_code_2(args, message):
    result = run("probe", *args)
    if message is None:  # only meaningful where CUDA is absent (CI never has a GPU)
        import torch
        if torch.cuda.is_available():
            return
        message = "device 'cuda:0' was asked for but CUDA is not available here; use --device cpu"
    assert result.exit_code == 2
    assert result.stderr == f"actstats: error: {message}\n"
    assert result.stdout == ""


def test_callable_that_raises(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def build():\n    raise ValueError('no weights here')\n")
    result = run("probe", f"{path}:build")
    assert result.exit_code == 2
    assert result.stderr == f"actstats: error: calling '{path}:build' raised ValueError: no weights here\n"


def test_debug_shows_the_traceback():
    result = run("probe", "missing.py:build", "--debug")
    assert result.exit_code == 1 and result.exception is not None  # CliRunner catches the raised error


def test_malformed_option_is_a_usage_error():
    result = run("probe", CIFAR, "--batches", "0")
    assert result.exit_code == 2 and "Usage:" in result.stderr


def test_help_lists_every_option_with_defaults():
    result = run("probe", "--help")
    assert result.exit_code == 0
    for option in ["--inputs", "--input-shape", "--input-dtype", "--vocab-size", "--batch-size", "--batches",
                   "--seed", "--device", "--eval", "--no-backward", "--format", "--json", "--debug"]:
        assert option in result.stdout, option
    assert "default: 4" in result.stdout


def test_logdir_writes_tensorboard_runs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run("probe", CIFAR, "--input-shape", "3,32,32", "--batch-size", "4", "--batches", "1",
                 "--logdir", str(tmp_path / "probe"), "--bins", "16")
    assert result.exit_code == 0, result.output
    acc = EventAccumulator(str(tmp_path / "probe"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    histogram = acc.Histograms("activations/conv1")[0].histogram_value
    assert len(histogram.bucket) == 16 and sum(histogram.bucket) == 4 * 6 * 28 * 28
    assert [e.step for e in acc.Scalars("propagation/act_rms")] == list(range(11))
    result = run("compare", "examples/deep_mlp.py:build", "--inits", "default,normal:std=0.05", "--batches", "1",
                 "--logdir", str(tmp_path / "cmp"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["default", "normal_std=0.05"]
