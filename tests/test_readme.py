"""Every command of README.md runs, so the first page a newcomer reads cannot go stale.

Each line of every ```bash block (continuations joined, `#` comments dropped) and every ```python block is covered by a
rule of RULES below (the first that matches). A README line no rule covers FAILS `test_every_readme_line_is_covered`,
so a new command cannot be added untested: add a rule here with it. The rules, and what makes each one cheap:

- `[sudo] apt-get update`, `[sudo] apt-get install -y PKG ...`: NOT RUN (they need root and the network); shape
  checked, PKG in APT_PACKAGES.
- `pip install -e .`, `pip install -e ".[X]"`, `pip install torch --index-url URL`: NOT RUN (the network); shape
  checked, X an extra of setup.cfg, URL the CPU wheel index.
- `pytest`, `pytest -m "not slow"`: NOT RUN; this file is part of what they run.
- `python train_accelerate.py --config configs/smoke.yaml` (no other option): RUN FOR REAL in a subprocess from the
  repository root, with `--output_dir <tmp>/out-smoke --data_dir <small synthetic IDX files>` appended (the trainer
  refuses a folder that holds an earlier run).
- any other trainer line, `accelerate launch [OPTS] train_accelerate.py ...`, `torchrun --nproc_per_node N
  train_accelerate.py ...` or `python train_accelerate.py ...`: RUN with `--dry_run` appended, so the launcher line,
  the config and every option parse and the config resolves; nothing is trained or written. torchrun also gets
  `--master_port <a free port>`, not the fixed 29500 another test's torchrun may hold.
- `ddpm-fashion sample|compare|evaluate|forward ...`: RUN through `ddpm_fashion.cli.main` (the entry point), every line
  in order in one new folder, so two lines writing one file fail. CLI_SUBSTITUTIONS: `--model` -> a tiny saved
  pipeline; `--num_inference_steps` -> 2; `--num_images`, `--batch_size` -> 2 (evaluate: `--num_samples`,
  `--batch_size` -> 10, its minimum); `--data_dir` -> small synthetic IDX files (evaluate, forward). Each is added
  where the line lacks it (CLI_ADDED), so no line walks 1000 steps.
- a ```python block: RUN (exec) in a new folder, its model path literal ("out-cpu", "out",
  "benchmarks/results/reference-model") replaced by the tiny saved pipeline.

Also checked: README.md has at most MAX_LINES lines and only bash/python/text code blocks, every relative link (docs,
benchmarks/README.md, pictures; #anchors included) exists, and every DDIM snippet passes clip_sample=False. The
subprocess tests are marked `slow`. ddpm_fashion is imported only through its public API and `ddpm_fashion.cli.main`.
"""

import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ENV, ROOT, write_synthetic_fashion_mnist

README = ROOT / "README.md"
MAX_LINES = 250
BIN = Path(sys.executable).parent
APT_PACKAGES = {"dataset-fashion-mnist"}
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
MODEL_LITERALS = ('"out-cpu"', '"out"', '"benchmarks/results/reference-model"')
CODE_LANGUAGES = {"bash", "python", "text"}


# ---- reading README.md -------------------------------------------------------------------------------------------

def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def code_blocks(text: str):
    """(language, body, first line number) of every fenced block."""
    blocks, language, body, start = [], None, [], 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if language is None:
                language, body, start = line[3:].strip(), [], number + 1
            else:
                blocks.append((language, "\n".join(body) + "\n", start))
                language = None
        elif language is not None:
            body.append(line)
    assert language is None, f"README.md: the code block opened at line {start - 1} is never closed"
    return blocks


def bash_commands(text: str):
    """(line number, argv) of every command of the bash blocks: continuations joined, comments dropped."""
    commands = []
    for language, body, start in code_blocks(text):
        if language != "bash":
            continue
        pending, first = "", None
        for offset, line in enumerate(body.splitlines()):
            first = start + offset if not pending else first
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            argv = shlex.split(pending + line, comments=True)
            pending = ""
            if argv:
                commands.append((first, argv))
        assert not pending, f"README.md line {first}: a continuation with no line after it"
    return commands


def python_blocks(text: str):
    return [(start, body) for language, body, start in code_blocks(text) if language == "python"]


# ---- the rules ---------------------------------------------------------------------------------------------------

# What each subcommand gets instead of the README's values (option -> value); an option in
# CLI_ADDED is appended when the README line lacks it.
CLI_SUBSTITUTIONS = {
    "sample": {"--model": "MODEL", "--num_inference_steps": "2", "--num_images": "2", "--batch_size": "2"},
    "compare": {"--model": "MODEL", "--num_inference_steps": "2", "--num_images": "2"},
    "evaluate": {"--model": "MODEL", "--num_inference_steps": "2", "--num_samples": "10", "--batch_size": "10",
                 "--data_dir": "DATA"},
    "forward": {"--data_dir": "DATA"},
}
CLI_ADDED = {"--num_inference_steps", "--num_images", "--num_samples", "--batch_size", "--data_dir"}
CLI_OUTPUTS = {"--out", "--gif", "--json", "--samples_file"}
DEFAULT_OUTPUTS = {"sample": "samples.png", "forward": "forward.png"}


def setup_cfg_extras():
    text = (ROOT / "setup.cfg").read_text()
    section = text.split("[options.extras_require]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^(\w+)\s*=", section, flags=re.M))


def is_trainer(argv):
    """A launcher line of train_accelerate.py: accelerate launch [OPTS], torchrun --nproc_per_node N, or python."""
    if "train_accelerate.py" not in argv:
        return False
    launcher = argv[:argv.index("train_accelerate.py")]
    if launcher == ["python"]:
        return True
    if launcher[:2] == ["accelerate", "launch"]:
        return all(arg.startswith("--") or arg.isdigit() or arg in {"inductor", "eager", "bf16", "fp16", "no"}
                   for arg in launcher[2:])
    return len(launcher) == 3 and launcher[:2] == ["torchrun", "--nproc_per_node"] and launcher[2].isdigit()


def is_smoke_run(argv):
    return argv == ["python", "train_accelerate.py", "--config", "configs/smoke.yaml"]


def shape_apt(argv):
    args = argv[1:] if argv[0] == "sudo" else argv
    return args == ["apt-get", "update"] or (
        args[:3] == ["apt-get", "install", "-y"] and len(args) > 3 and set(args[3:]) <= APT_PACKAGES)


def shape_pip(argv):
    if argv == ["pip", "install", "torch", "--index-url", CPU_TORCH_INDEX] or argv == ["pip", "install", "-e", "."]:
        return True
    editable_with_extras = len(argv) == 4 and argv[:3] == ["pip", "install", "-e"]
    match = re.fullmatch(r"\.\[([\w,]+)\]", argv[3]) if editable_with_extras else None
    return bool(match) and set(match.group(1).split(",")) <= setup_cfg_extras()


def shape_pytest(argv):
    return argv in (["pytest"], ["pytest", "-m", "not slow"])


def is_cli(argv):
    return argv[0] == "ddpm-fashion" and len(argv) > 1 and argv[1] in CLI_SUBSTITUTIONS


# name, matches(argv), run: None (shape only, with the reason) or the test that runs it
RULES = [
    ("apt-get", lambda argv: "apt-get" in argv[:2], "not run: needs root and the network; shape checked"),
    ("pip", lambda argv: argv[:2] == ["pip", "install"], "not run: needs the network; shape checked"),
    ("pytest", lambda argv: argv[0] == "pytest", "not run: the test suite, this file included"),
    ("smoke training", is_smoke_run, "run for real: test_the_smoke_training_line_trains"),
    ("trainer", is_trainer, "run with --dry_run: test_readme_training_line_parses"),
    ("ddpm-fashion", is_cli, "run on a tiny pipeline: test_readme_ddpm_fashion_lines_run_in_order"),
]
SHAPES = {"apt-get": shape_apt, "pip": shape_pip, "pytest": shape_pytest}


def rule_of(argv):
    return next((name for name, matches, _ in RULES if matches(argv)), None)


COMMANDS = bash_commands(readme_text())
TRAINER_LINES = [(n, argv) for n, argv in COMMANDS if rule_of(argv) == "trainer"]
SMOKE_LINES = [(n, argv) for n, argv in COMMANDS if rule_of(argv) == "smoke training"]
PYTHON_BLOCKS = python_blocks(readme_text())


# ---- the README's shape --------------------------------------------------------------------------------------------

def test_readme_is_at_most_250_lines():
    assert len(readme_text().splitlines()) <= MAX_LINES


def test_code_blocks_are_bash_python_or_text():
    languages = {language for language, _, _ in code_blocks(readme_text())}
    assert languages <= CODE_LANGUAGES, f"a README block in {languages - CODE_LANGUAGES}: no rule runs it"


def test_every_readme_line_is_covered():
    uncovered = [f"line {n}: {shlex.join(argv)}" for n, argv in COMMANDS if rule_of(argv) is None]
    assert not uncovered, "README.md commands no rule of tests/test_readme.py covers:\n" + "\n".join(uncovered)
    assert TRAINER_LINES and SMOKE_LINES and PYTHON_BLOCKS


@pytest.mark.parametrize("rule", sorted(SHAPES))
def test_lines_not_run_have_the_right_shape(rule):
    lines = [(n, argv) for n, argv in COMMANDS if rule_of(argv) == rule]
    assert lines, f"no README line for the {rule} rule: drop the rule"
    for n, argv in lines:
        assert SHAPES[rule](argv), f"README.md line {n}: {shlex.join(argv)} is not a known {rule} line"


def github_anchor(heading: str) -> str:
    """GitHub's id of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path):
    return {github_anchor(line.lstrip("#")) for line in path.read_text(encoding="utf-8").splitlines()
            if re.match(r"#{1,6} ", line)}


def test_every_relative_link_exists():
    text = re.sub(r"^```.*?^```", "", readme_text(), flags=re.S | re.M)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = ROOT / target if target else README
        assert path.exists(), f"README.md links to {link}, which does not exist"
        if anchor:
            assert anchor in anchors(path), f"README.md links to {link}: {target or 'README.md'} has no such heading"


def test_ddim_snippets_do_not_inherit_clip_sample():
    """DDIMScheduler.from_config(pipe.scheduler.config) alone inherits the DDPM config's clip_sample=True."""
    calls = [line for _, body in PYTHON_BLOCKS for line in body.splitlines() if "DDIMScheduler.from_config(" in line]
    assert calls and all("clip_sample=False" in line for line in calls), calls


# ---- running the commands --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    """Four small FashionMNIST-like IDX files: random images, balanced labels."""
    return Path(write_synthetic_fashion_mnist(tmp_path_factory.mktemp("synthetic-fashion-mnist")))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A saved DDPMPipeline: a small random UNet2DModel on 32x32 images and the 1000-step schedule."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_trainer(argv, *extra):
    """Run a README trainer line from the repository root with this environment's launchers, `extra` appended."""
    launcher = {"python": [sys.executable], "accelerate": [str(BIN / "accelerate")],
                "torchrun": [str(BIN / "torchrun"), "--master_port", str(free_port())]}  # not torchrun's fixed 29500
    command = launcher[argv[0]] + argv[1:] + [str(arg) for arg in extra]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{shlex.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def launcher_of(argv):
    """Get the launcher part of a trainer line (what comes before train_accelerate.py)."""
    return tuple(argv[:argv.index("train_accelerate.py")])


# The first line of each launcher runs through it in a subprocess; the launcher then proven, the rest of its lines run
# their options through the trainer's main() in this process (a launcher start costs 10-20 s on 2 cores).
LAUNCHED = {launcher_of(argv): n for n, argv in reversed(TRAINER_LINES)}


@pytest.mark.slow
@pytest.mark.parametrize("line", TRAINER_LINES, ids=[f"line{n}" for n, _ in TRAINER_LINES])
def test_readme_training_line_parses(line, capsys):
    number, argv = line
    dry_run = [] if "--dry_run" in argv else ["--dry_run"]
    if LAUNCHED[launcher_of(argv)] == number:
        printed = run_trainer(argv, *dry_run).stdout
    else:
        sys.path.insert(0, str(ROOT))
        import train_accelerate

        assert train_accelerate.main(argv[argv.index("train_accelerate.py") + 1:] + dry_run) == 0
        printed = capsys.readouterr().out
    assert "output_dir:" in printed and "unet:" in printed


@pytest.mark.slow
@pytest.mark.parametrize("line", SMOKE_LINES, ids=[f"line{n}" for n, _ in SMOKE_LINES])
def test_the_smoke_training_line_trains(line, tmp_path, synthetic_data):
    _, argv = line
    run_trainer(argv, "--output_dir", tmp_path / "out-smoke", "--data_dir", synthetic_data)
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "train_config.yaml", "samples.png"):
        assert (tmp_path / "out-smoke" / name).is_file(), name


def substituted(argv, model, data):
    """The README's argv with CLI_SUBSTITUTIONS applied; also the files it should write."""
    subcommand, args = argv[1], list(argv[2:])
    values = {option: {"MODEL": str(model), "DATA": str(data)}.get(value, value)
              for option, value in CLI_SUBSTITUTIONS[subcommand].items()}
    for index, arg in enumerate(args[:-1]):
        if arg in values:
            args[index + 1] = values[arg]
    args += [part for option, value in values.items() if option not in args and option in CLI_ADDED
             for part in (option, value)]
    outputs = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in CLI_OUTPUTS]
    if subcommand in DEFAULT_OUTPUTS and "--out" not in args:
        outputs.append(DEFAULT_OUTPUTS[subcommand])
    return [subcommand, *args], outputs


def test_readme_ddpm_fashion_lines_run_in_order(tiny_model, synthetic_data, tmp_path, monkeypatch, one_thread):
    from ddpm_fashion.cli import main

    lines = [(n, argv) for n, argv in COMMANDS if rule_of(argv) == "ddpm-fashion"]
    assert lines
    monkeypatch.chdir(tmp_path)
    for n, argv in lines:
        args, outputs = substituted(argv, tiny_model, synthetic_data)
        assert main(args) == 0, f"README.md line {n}: {shlex.join(argv)} (run as {shlex.join(args)}) failed"
        for output in outputs:
            assert (tmp_path / output).is_file(), f"README.md line {n}: {output} was not written"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"line{start}" for start, _ in PYTHON_BLOCKS])
def test_readme_python_block_runs(block, tiny_model, tmp_path, monkeypatch, one_thread):
    start, body = block
    for literal in MODEL_LITERALS:
        body = body.replace(literal, repr(str(tiny_model)))
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    exec(compile("\n" * (start - 1) + body, str(README), "exec"), namespace)
    for written in re.findall(r'\.save(?:_pretrained)?\("([^"]+)"\)', body):
        assert (tmp_path / written).exists(), f"README.md block at line {start} did not write {written}"
    check_known_results(body, namespace, tiny_model, tmp_path)


def check_known_results(body, namespace, tiny_model, tmp_path):
    """What the swap and conversion snippets promise: the swapped parts are in place; the weights survive the trip."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DModel

    import ddpm_fashion

    if "pipe.unet = ddpm_fashion.UNet.from_diffusers" in body:
        assert isinstance(namespace["pipe"].unet, ddpm_fashion.UNet)
        assert isinstance(namespace["pipe"].scheduler, DPMSolverMultistepScheduler)
        assert namespace["pipe"].scheduler.config.algorithm_type == "dpmsolver++"
        assert namespace["images"][0].size == (32, 32)
    if 'save_pretrained("unet-copy")' in body:
        copy = UNet2DModel.from_pretrained(tmp_path / "unet-copy")
        original = UNet2DModel.from_pretrained(tiny_model, subfolder="unet")
        for (name, a), b in zip(original.state_dict().items(), copy.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
