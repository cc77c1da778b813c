"""benchmarks/diffusers_suite.py: diffusers' own UNet2DModel and DDPM pipeline tests run on our classes.

The rewriting and the verdict are tested on a tiny fake checkout, so CI exercises them without diffusers' tests; the
real run needs a diffusers checkout, named by DDPM_FASHION_DIFFUSERS_CHECKOUT, and says so when there is none.
"""

import os
import subprocess
import sys
import textwrap

import diffusers
import pytest
from diffusers import UNet2DModel

import ddpm_fashion
from conftest import load_benchmark

suite = load_benchmark("diffusers_suite")
CHECKOUT_VARIABLE = "DDPM_FASHION_DIFFUSERS_CHECKOUT"

FAKE_MODEL_TESTS = textwrap.dedent('''\
    import pytest
    from diffusers import UNet2DModel


    class Unet2DModelTesterConfig:
        @property
        def model_class(self):
            return UNet2DModel


    class TestUnet2DModel(Unet2DModelTesterConfig):
        def test_runs_ours(self):
            assert self.model_class.__module__.startswith("ddpm_fashion")

        def test_any_class(self):
            assert self.model_class.__name__ in ("UNet2DModel", "UNet")

        @pytest.mark.skip("needs an accelerator")
        def test_skipped(self):
            pass


    class UNetLDMModelTesterConfig:
        @property
        def model_class(self):
            return UNet2DModel


    class TestUNetLDMModel(UNetLDMModelTesterConfig):
        def test_runs_stock(self):
            assert self.model_class is UNet2DModel

        def test_hub(self):
            assert UNet2DModel is None  # fails for both, as the Hub tests do offline


    class NCSNppModelTesterConfig:
        @property
        def model_class(self):
            return UNet2DModel


    class TestNCSNppModel(NCSNppModelTesterConfig):
        def test_never_run(self):
            raise AssertionError("the NCSN++ groups are not run")
    ''')

FAKE_PIPELINE_TESTS = textwrap.dedent('''\
    import unittest

    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel


    class DDPMPipelineFastTests(unittest.TestCase):
        def test_classes(self):
            assert DDPMPipeline.__module__.startswith("diffusers")
            assert UNet2DModel.__module__.startswith(("diffusers", "ddpm_fashion"))
            assert DDPMScheduler.__module__.startswith(("diffusers", "ddpm_fashion"))
    ''')


@pytest.fixture
def fake_checkout(tmp_path):
    """A folder shaped like a diffusers checkout, holding fake versions of the two test files."""
    checkout = tmp_path / "diffusers"
    for package in ("tests", "tests/models", "tests/models/unets", "tests/pipelines", "tests/pipelines/ddpm"):
        (checkout / package).mkdir(parents=True)
        (checkout / package / "__init__.py").write_text("")
    (checkout / suite.MODEL_TESTS).write_text(FAKE_MODEL_TESTS)
    (checkout / suite.PIPELINE_TESTS).write_text(FAKE_PIPELINE_TESTS)
    return checkout


def run_module(source):
    """Get the names a test file's top level binds."""
    namespace = {}
    exec(compile(source, "<rewritten>", "exec"), namespace)
    return namespace


def test_model_tests_get_our_unet_in_the_unet2d_and_ldm_groups_only():
    rewritten = suite.swap_model_class(FAKE_MODEL_TESTS)
    namespace = run_module(rewritten)
    assert namespace["TestUnet2DModel"]().model_class is ddpm_fashion.UNet
    assert namespace["TestUNetLDMModel"]().model_class is ddpm_fashion.UNet
    assert namespace["TestNCSNppModel"]().model_class is UNet2DModel
    # Nothing else changes: one import added, one name in each of the two model_class bodies.
    changed = [line for line in rewritten.splitlines() if line not in FAKE_MODEL_TESTS.splitlines()]
    assert changed == ["from ddpm_fashion import UNet as DdpmFashionUNet"] + ["        return DdpmFashionUNet"] * 2


def test_pipeline_tests_get_our_unet_and_scheduler_and_diffusers_pipeline():
    namespace = run_module(suite.swap_pipeline_classes(FAKE_PIPELINE_TESTS))
    assert namespace["UNet2DModel"] is ddpm_fashion.UNet
    assert namespace["DDPMScheduler"] is ddpm_fashion.DDPMScheduler
    assert namespace["DDPMPipeline"] is diffusers.DDPMPipeline


@pytest.mark.parametrize("swap,source", [
    (suite.swap_model_class, FAKE_MODEL_TESTS.replace("class UNetLDMModelTesterConfig", "class Renamed")),
    (suite.swap_pipeline_classes, FAKE_PIPELINE_TESTS.replace(", UNet2DModel", "")),
])
def test_a_test_file_of_another_layout_is_refused_rather_than_run_stock(swap, source):
    with pytest.raises(ValueError, match="layout changed, update benchmarks/diffusers_suite.py"):
        swap(source)


def test_a_folder_without_diffusers_tests_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="must be a diffusers checkout"):
        suite.prepare(tmp_path, tmp_path / "work")


@pytest.mark.slow  # two pytest processes, each importing torch and diffusers
def test_counts_per_group_and_the_verdict_on_a_fake_checkout(fake_checkout, tmp_path, capsys, monkeypatch):
    kept = tmp_path / "kept"
    assert suite.main(["--checkout", str(fake_checkout), "--keep", str(kept)]) == 1
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.startswith(("Test", "DDPM"))}
    # stock passed / failed / skipped, then ours; the NCSN++ group is not run.
    assert rows["TestUnet2DModel"] == ["1", "/", "1", "/", "1", "2", "/", "0", "/", "1"]
    assert rows["TestUNetLDMModel"] == ["1", "/", "1", "/", "0", "0", "/", "2", "/", "0"]
    assert rows["DDPMPipelineFastTests"] == ["1", "/", "0", "/", "0", "1", "/", "0", "/", "0"]
    assert "TestNCSNppModel" not in rows
    assert "1 test(s) pass with diffusers' classes and not with ours:\n  TestUNetLDMModel::test_runs_stock" in printed

    # A named exclusion is what lets such a test fail for ours.
    stock, ours = suite.outcomes(kept / "stock.xml"), suite.outcomes(kept / "ours.xml")
    monkeypatch.setitem(suite.EXCLUSIONS, "TestUNetLDMModel::test_runs_stock", "tests the stock class itself")
    assert suite.regressions(stock, ours) == []


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(CHECKOUT_VARIABLE),
                    reason=f"no diffusers checkout: set {CHECKOUT_VARIABLE}=path (a folder holding diffusers' tests/, "
                           f"e.g. the installed version's tag) to run diffusers' own tests on our classes")
def test_our_classes_pass_every_diffusers_test_that_theirs_pass():
    result = subprocess.run([sys.executable, os.path.join(os.path.dirname(suite.__file__), "diffusers_suite.py"),
                             "--checkout", os.environ[CHECKOUT_VARIABLE]], capture_output=True, text=True)
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
