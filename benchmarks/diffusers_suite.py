"""diffusers' own tests, run on our classes: the UNet2DModel tests with ddpm_fashion.UNet, the DDPM pipeline tests with
our UNet and DDPMScheduler.

    python benchmarks/diffusers_suite.py --checkout PATH

PATH is a diffusers checkout: a folder holding diffusers' tests/ (the repository's tests at the installed version's
tag, or the nearest; PyPI's sdist has none). The script copies that tests/ package into a temporary folder twice,
leaves one copy as it is ("stock") and rewrites, in the other ("ours"), only the class under test:

- tests/models/unets/test_models_unet_2d.py: `model_class` of the UNet2D and LDM groups returns ddpm_fashion.UNet
  (the NCSN++ groups are not run: they test Fourier time embeddings and skip blocks, which our U-Net refuses);
- tests/pipelines/ddpm/test_ddpm.py: the names UNet2DModel and DDPMScheduler are bound to ddpm_fashion's classes.

It runs pytest on the same test groups of both copies (offline: HF_HUB_OFFLINE=1), prints the passed / failed /
skipped counts per group for both, and exits 1 if a test that passes stock does not pass ours, except the named
EXCLUSIONS (each with its reason). Tests that fail for both (the Hub downloads, offline) are counted, not ours to fix.
"""

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

MODEL_TESTS = "tests/models/unets/test_models_unet_2d.py"
PIPELINE_TESTS = "tests/pipelines/ddpm/test_ddpm.py"
# The config classes whose model_class becomes ours, and the test groups (classes) built on them.
MODEL_CONFIG_CLASSES = ("Unet2DModelTesterConfig", "UNetLDMModelTesterConfig")
MODEL_GROUPS = ("TestUnet2DModel", "TestUnet2DModelTraining", "TestUnet2DModelMemory",
                "TestUNetLDMModel", "TestUNetLDMModelTraining", "TestUNetLDMModelMemory")
PIPELINE_GROUPS = ("DDPMPipelineFastTests", "DDPMPipelineIntegrationTests")
# Tests allowed to pass stock and not ours, as {"Group::test": reason}. None so far.
EXCLUSIONS: dict = {}


def swap_model_class(source: str) -> str:
    """Get test_models_unet_2d.py with the UNet2D and LDM groups' model_class returning ddpm_fashion.UNet.

    Only the `return UNet2DModel` inside those classes' model_class changes, and one import is added; a file whose
    layout differs raises ValueError (a silent non-swap would run the stock class and report it as ours).
    """
    lines = source.splitlines(keepends=True)
    swapped = set()
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.ClassDef) and node.name in MODEL_CONFIG_CLASSES):
            continue
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == "model_class":
                for statement in item.body:
                    if (isinstance(statement, ast.Return) and isinstance(statement.value, ast.Name)
                            and statement.value.id == "UNet2DModel"):
                        line = statement.lineno - 1
                        lines[line] = lines[line].replace("UNet2DModel", "DdpmFashionUNet")
                        swapped.add(node.name)
    missing = sorted(set(MODEL_CONFIG_CLASSES) - swapped)
    if missing:
        raise ValueError(f"{MODEL_TESTS}: no `model_class` returning UNet2DModel in {', '.join(missing)}; "
                         f"the file's layout changed, update benchmarks/diffusers_suite.py")
    return _add_import(lines, "from ddpm_fashion import UNet as DdpmFashionUNet\n")


def swap_pipeline_classes(source: str) -> str:
    """Get test_ddpm.py with the names UNet2DModel and DDPMScheduler bound to ddpm_fashion's classes.

    An import after diffusers' rebinds both names for the whole file; DDPMPipeline stays diffusers'.
    """
    imported = {alias.name for node in ast.parse(source).body if isinstance(node, ast.ImportFrom)
                and node.module == "diffusers" for alias in node.names}
    if not {"UNet2DModel", "DDPMScheduler"} <= imported:
        raise ValueError(f"{PIPELINE_TESTS}: UNet2DModel and DDPMScheduler are not imported from diffusers; "
                         f"the file's layout changed, update benchmarks/diffusers_suite.py")
    return _add_import(source.splitlines(keepends=True),
                       "from ddpm_fashion import DDPMScheduler, UNet as UNet2DModel  # the classes under test\n")


def _add_import(lines, statement: str) -> str:
    """Get the file with statement inserted after its last top-level import (so it rebinds what they bound)."""
    tree = ast.parse("".join(lines))
    last = max(node.end_lineno for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))
    return "".join(lines[:last] + [statement] + lines[last:])


SWAPS = {MODEL_TESTS: swap_model_class, PIPELINE_TESTS: swap_pipeline_classes}
GROUPS = {MODEL_TESTS: MODEL_GROUPS, PIPELINE_TESTS: PIPELINE_GROUPS}


def prepare(checkout: Path, workdir: Path) -> dict:
    """Copy the checkout's tests/ to workdir/stock and workdir/ours, rewriting ours; get {variant: root}."""
    tests = checkout / "tests"
    for relative in SWAPS:
        if not (checkout / relative).is_file():
            raise FileNotFoundError(f"{checkout / relative} not found: --checkout must be a diffusers checkout "
                                    f"(the folder holding its tests/)")
    roots = {}
    for variant in ("stock", "ours"):
        root = workdir / variant
        shutil.copytree(tests, root / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        if variant == "ours":
            for relative, swap in SWAPS.items():
                path = root / relative
                path.write_text(swap(path.read_text()))
        roots[variant] = root
    return roots


def run_pytest(root: Path, report: Path, extra_args=()) -> None:
    """Run the swapped groups' tests under root with pytest, writing a JUnit report."""
    node_ids = [f"{relative}::{group}" for relative, groups in GROUPS.items() for group in groups
                if f"class {group}(" in (root / relative).read_text()]
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "addopts=",
               f"--junitxml={report}", *node_ids, *extra_args]
    # pytest's exit code says only that some test failed, which the stock run does too (the Hub tests, offline).
    subprocess.run(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, check=False)
    if not report.is_file():
        raise RuntimeError(f"pytest wrote no report in {root}; run it there by hand: {' '.join(command)}")


def outcomes(report: Path) -> dict:
    """Get {"Group::test[param]": "passed" | "failed" | "skipped"} from a JUnit report."""
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        group = case.get("classname", "").rsplit(".", 1)[-1]
        kinds = {child.tag for child in case}
        outcome = ("failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed")
        results[f"{group}::{case.get('name')}"] = outcome
    return results


def summary(results: dict) -> dict:
    """Get {group: Counter(passed=, failed=, skipped=)} for the results of one run."""
    groups = {}
    for test, outcome in results.items():
        groups.setdefault(test.split("::")[0], Counter())[outcome] += 1
    return groups


def regressions(stock: dict, ours: dict) -> list:
    """Get the tests that pass stock and not ours, exclusions left out, sorted."""
    return sorted(test for test, outcome in stock.items()
                  if outcome == "passed" and ours.get(test) != "passed" and test not in EXCLUSIONS)


def format_counts(stock: dict, ours: dict) -> str:
    """Get the per-group table: passed / failed / skipped for stock and ours, then the totals."""
    def cell(counter):
        return f"{counter['passed']:3d} / {counter['failed']:2d} / {counter['skipped']:2d}"

    stock_groups, our_groups = summary(stock), summary(ours)
    rows = [f"{'group':34} {'stock pass/fail/skip':>21}  {'ours pass/fail/skip':>20}"]
    for group in sorted(set(stock_groups) | set(our_groups)):
        rows.append(f"{group:34} {cell(stock_groups.get(group, Counter())):>21}  "
                    f"{cell(our_groups.get(group, Counter())):>20}")
    rows.append(f"{'total':34} {cell(Counter(stock.values())):>21}  {cell(Counter(ours.values())):>20}")
    return "\n".join(rows)


def main(argv=None) -> int:
    """Run the comparison; get the exit code (0: every test that passes stock passes ours, or is excluded)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", required=True, type=Path, help="a diffusers checkout (the folder with tests/)")
    parser.add_argument("--keep", type=Path, help="write the two test trees and reports here instead of a temp dir")
    args, pytest_args = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="diffusers_suite_") as temporary:
        workdir = args.keep or Path(temporary)
        roots = prepare(args.checkout, workdir)
        results = {}
        for variant, root in roots.items():
            run_pytest(root, workdir / f"{variant}.xml", pytest_args)
            results[variant] = outcomes(workdir / f"{variant}.xml")
    for relative in SWAPS:
        module = relative[:-3].replace("/", ".")
        in_file = {test: outcome for test, outcome in results["stock"].items()
                   if test.split("::")[0] in GROUPS[relative]}
        ours = {test: outcome for test, outcome in results["ours"].items() if test.split("::")[0] in GROUPS[relative]}
        print(f"{module}: {swap_summary(relative)}")
        print(format_counts(in_file, ours))
        print()
    for test, reason in EXCLUSIONS.items():
        print(f"excluded: {test}: {reason}")
    failing = regressions(results["stock"], results["ours"])
    if failing:
        print(f"{len(failing)} test(s) pass with diffusers' classes and not with ours:")
        print("\n".join(f"  {test} ({results['ours'].get(test, 'not run')})" for test in failing))
        return 1
    print("every test that passes with diffusers' classes passes with ours")
    return 0


def swap_summary(relative: str) -> str:
    """Get a line saying which classes a test file runs with in the 'ours' copy."""
    if relative == MODEL_TESTS:
        return "model_class = ddpm_fashion.UNet in " + ", ".join(MODEL_CONFIG_CLASSES)
    return "UNet2DModel, DDPMScheduler = ddpm_fashion.UNet, ddpm_fashion.DDPMScheduler"


if __name__ == "__main__":
    sys.exit(main())
