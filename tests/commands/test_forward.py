"""`ddpm-fashion forward` (ddpm_fashion/commands/forward.py): the forward-process figure from IDX files and from the
real data, and its refusals."""

import os

import pytest
from PIL import Image

from conftest import run_cli, write_synthetic_fashion_mnist

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_forward_figure_from_synthetic_idx_files(tmp_path, capsys):
    data_dir = write_synthetic_fashion_mnist(tmp_path, num_train=20, num_test=20)
    out = tmp_path / "figure" / "forward.png"
    out.parent.mkdir()
    code, stdout, _ = run_cli(["forward", "--data_dir", data_dir, "--out", out, "--dpi", 40], capsys)
    assert code == 0 and f"to {out}" in stdout
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.width > 200 and figure.height > 200
    assert os.listdir(out.parent) == ["forward.png"]


def test_forward_figure_on_real_fashion_mnist(real_data_dir, tmp_path, capsys):
    out = tmp_path / "forward.png"
    code, _, _ = run_cli(["forward", "--data_dir", real_data_dir, "--out", out, "--dpi", 40], capsys)
    assert code == 0
    with Image.open(out) as figure:
        assert figure.format == "PNG"


def test_forward_without_data_is_refused(tmp_path, capsys):
    code, _, stderr = run_cli(["forward", "--out", tmp_path / "f.png", "--data_dir", tmp_path / "nowhere"], capsys)
    assert code == 2 and stderr.startswith("ddpm-fashion forward: error: data_dir") and stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dpi", ["100000", "0", "19", "601"])
def test_forward_dpi_outside_its_range_is_refused(tmp_path, capsys, dpi):
    code, _, stderr = run_cli(["forward", "--out", tmp_path / "f.png", "--dpi", dpi], capsys)
    assert code == 2 and f"argument --dpi: must be an integer from 20 to 600, got {dpi}" in stderr
    assert os.listdir(tmp_path) == []
