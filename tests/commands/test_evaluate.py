"""`ddpm-fashion evaluate` (ddpm_fashion/commands/evaluate.py): the report and its protocol for real images and for a
tiny random pipeline's, and one-line refusals of bad input. Its --samples_file: tests/sampling/test_samples_file.py."""

import json

import pytest

from conftest import run_cli
from ddpm_fashion.data import CLASS_NAMES
from ddpm_fashion.evaluation.reference_cache import CACHE_ENV

JSON_KEYS = {"fid", "features", "num_samples", "reference", "sampler", "num_inference_steps", "precision", "recall",
             "class_histogram", "class_kl_from_uniform", "seed", "image_size", "crop", "feature_extractor"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_evaluate_real_train_writes_the_report_and_protocol(real_data_dir, reference_cache, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(reference_cache))
    report_path = tmp_path / "report.json"
    code, out, err = run_cli(["evaluate", "--model", "real-train", "--num_samples", 500, "--json", report_path,
                              "--data_dir", real_data_dir, "--device", "cpu"], capsys)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert JSON_KEYS <= set(report)
    assert report["num_samples"] == 500 and report["features"] == "fmnist" and report["reference"] == "test"
    assert report["model"] == "real-train" and report["sampler"] is None and report["num_inference_steps"] is None
    assert list(report["class_histogram"]) == list(CLASS_NAMES)
    assert sum(report["class_histogram"].values()) == pytest.approx(1.0)
    assert 0 <= report["fid"] < 5 and 0 < report["precision"] <= 1 and 0 < report["recall"] <= 1
    assert f"FID {report['fid']:.3f}" in out and "protocol:" in out


def test_evaluate_generated_images_reports_sampler_and_speed(tiny_pipeline, real_data_dir, reference_cache, tmp_path,
                                                             capsys, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(reference_cache))
    report_path = tmp_path / "report.json"
    code, out, err = run_cli(["evaluate", "--model", tiny_pipeline, "--num_samples", 20, "--scheduler", "ddim",
                              "--num_inference_steps", 2, "--batch_size", 10, "--json", report_path,
                              "--data_dir", real_data_dir, "--device", "cpu"], capsys)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert JSON_KEYS <= set(report)
    assert report["sampler"] == "ddim" and report["num_inference_steps"] == 2 and report["num_samples"] == 20
    assert report["final_timestep"] == 40  # `ddim` ends its walk there (ddpm_fashion/schedulers/ddim.py)
    assert report["seconds_per_1000_images"] > 0 and "CPU" in report["machine"]
    assert report["fid"] > 10  # an untrained U-Net makes no garments
    assert "s per 1000 images" in out


@pytest.mark.parametrize("argv, message", [
    (["--features", "inception", "--inception_weights", "/nonexistent/inception.pth"], "--inception_weights"),
    (["--features", "inception"], "--inception_weights"),
    (["--inception_weights", "x.pth"], "only applies to --features inception"),
    (["--num_samples", "3"], "at least"),
    (["--json", "/nonexistent/report.json"], "does not exist"),
])
def test_evaluate_refuses_bad_input_in_one_line(argv, message, real_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached Inception weights to fall back to
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    code, out, err = run_cli(["evaluate", "--model", "real-train", "--num_samples", 20, "--data_dir", real_data_dir,
                              "--device", "cpu", *argv], capsys)
    assert code == 2
    assert err.startswith("ddpm-fashion evaluate: error:") and message in err
    assert len(err.strip().splitlines()) == 1
