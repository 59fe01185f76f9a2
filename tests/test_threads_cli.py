"""--threads on verify and train, and the thread policy's defaults through the CLI (issue 14)."""
import json

import pytest
import torch

from refnet import cli, settings


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    for var in settings.THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def verify_threads(tmp_path, capsys, *extra):
    out = tmp_path / "r.json"
    code = cli.main(["verify", "--example", "xor", "--device", "cpu", "--dtype", "float64",
                     "--quiet", "--json", str(out), *extra])
    capsys.readouterr()
    assert code == 0
    return json.loads(out.read_text())["summary"]["threads"]


def test_verify_examples_default_to_one_thread(tmp_path, capsys):
    torch.set_num_threads(2)
    assert verify_threads(tmp_path, capsys) == 1


def test_verify_threads_flag_and_env(tmp_path, capsys, monkeypatch):
    assert verify_threads(tmp_path, capsys, "--threads", "2") == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert verify_threads(tmp_path, capsys) == 3


@pytest.mark.parametrize("argv", [["verify", "--example", "xor", "--threads", "0"],
                                  ["train", "--example", "xor", "--threads", "0"]])
def test_bad_thread_count_is_one_line_exit_2(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0]


def test_train_applies_the_policy(capsys):
    torch.set_num_threads(2)
    assert cli.main(["train", "--example", "xor", "--device", "cpu", "--steps", "3",
                     "--quiet"]) == 0
    assert torch.get_num_threads() == 1
    assert cli.main(["train", "--example", "xor", "--device", "cpu", "--steps", "3",
                     "--quiet", "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
