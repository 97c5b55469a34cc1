"""Bad input fails at once: every problem of a config in one line (key, value, fix), exit code 2, and nothing
created: no run dir, no config.json. Each case alone in process (config_problems), then through the real
tools/train.py."""
import pytest
from helpers import assert_fails_in_one_line, run_tool
from test_train import TINY

from ssm_tread.train.config import load_config
from ssm_tread.train.validate import config_problems

# (override, the start of its one line): the cases a careless user tried (issue 12), each alone
CASES = [
    ("routing.routes=[(1, 5, 0.5)]", "routing.routes=[(1, 5, 0.5)]: route 0"),
    ("model.name=DiX", "model.name='DiX': unknown model 'DiX'. Did you mean 'DiT'?"),
    ("train.batch_size=0", "train.batch_size=0: must be >= 1"),
    ("train.grad_accum=0", "train.grad_accum=0: must be >= 1"),
    ("train.grad_accum=3", "train.batch_size=8: is not divisible by 1 rank(s) x train.grad_accum=3"),
    ("log.every=0", "log.every=0: must be >= 1"),
    ("optim.lr=-1", "optim.lr=-1.0: must be > 0"),
    ("train.steps=-1", "train.steps=-1: must be >= 1"),
    ("optim.schedule=linear", "optim.schedule='linear': unknown name; choose one of 'constant', 'cosine'"),
    ("sample.sampler=foo", "sample.sampler='foo': unknown name; choose one of 'euler', 'heun', 'euler_maruyama'"),
    ("train.precision=fp8", "train.precision='fp8': unknown name; choose one of 'bf16', 'fp32'"),
    ("train.keep_last=0", "train.keep_last=0: must be >= 1; e.g. train.keep_last=2 (pruning would delete the newest"),
    ("diffusion.objective=score", "diffusion.objective='score': unknown name; choose one of 'ddpm', 'flow'"),
    ("routing.loss=partial", "routing.loss='partial': unknown name"),
    ("data.name=latents", "data.root='data/imagenet256_latents': does not exist"),
    ("optim.betas=(0.9, 1.5)", "optim.betas=(0.9, 1.5): must be two numbers in [0, 1)"),
    ("model.class_dropout_prob=1.0", "model.class_dropout_prob=1.0: must be in [0, 1)"),
    ("sample.grid_classes=[3, 12]", "sample.grid_classes=[3, 12]: needs a list of classes in 0..9"),
    ("eval.every=5", "eval.every=5: needs the number of samples per evaluation"),
    ("train.resume=/no/such.pt", "train.resume='/no/such.pt': is not a file"),
]


def tiny(*overrides):
    return load_config("configs/quickstart.py", [*TINY, *overrides])


def test_the_tiny_config_is_valid():
    assert config_problems(tiny()) == []


@pytest.mark.parametrize("override, line", CASES, ids=[c[0] for c in CASES])
def test_each_bad_value_is_one_line_naming_key_value_and_fix(override, line):
    problems = config_problems(tiny(override))
    assert len(problems) == 1 and problems[0].startswith(line), problems
    assert "; " in problems[0]  # the fix follows the problem


@pytest.mark.parametrize("override", ["model.kwargs.foo=1", "model.kwargs.route_ratio=0.5"])
def test_an_unknown_model_keyword_is_blamed_on_the_model_kwargs(override):
    problems = config_problems(load_config("configs/quickstart.py", [override]))
    key = override.split(".")[2].split("=")[0]
    assert len(problems) == 1 and problems[0].startswith("model.kwargs={"), problems
    assert f"DiM: unknown argument(s) {key}" in problems[0]


def test_an_unknown_model_name_lists_every_registered_name():
    from ssm_tread.models import MODEL_NAMES

    (problem,) = config_problems(tiny("model.name=DiT-S/3"))
    fix = problem.split("; ", 1)[1]
    assert all(name in fix for name in ["DiT-S/4", "DiM-H/2", "ZigMa-S/4", *MODEL_NAMES]), problem


def test_a_value_of_the_wrong_type_in_a_config_file(tmp_path):
    path = tmp_path / "typed.py"
    path.write_text("from quickstart import *\ntrain['steps'] = '100'\noptim['lr'] = None\n")
    problems = config_problems(load_config(path))
    assert problems == ["optim.lr=None: expected float like 0.0001; set optim.lr=<float>",
                        "train.steps='100': expected int like 400000; set train.steps=<int>"]


def test_every_problem_at_once_through_the_tool_creates_nothing(tmp_path):
    cases = [c for c in CASES if not c[0].startswith(("model.name", "data.name", "train.grad_accum=3", "diffusion.objective"))]
    run_dir = tmp_path / "run"
    done = run_tool("tools/train.py", "configs/quickstart.py", *TINY, f"train.run_dir={run_dir}",
                    *(override for override, _ in cases))
    assert_fails_in_one_line(done, 2, *(f"error: {line}" for _, line in cases), lines=len(cases))
    assert not run_dir.exists()


def test_unknown_model_through_the_tool(tmp_path):
    done = run_tool("tools/train.py", "configs/quickstart.py", *TINY, f"train.run_dir={tmp_path / 'run'}",
                    "model.name=DiX")
    assert_fails_in_one_line(done, 2, "error: model.name='DiX': unknown model 'DiX'. Did you mean 'DiT'?")
    assert not (tmp_path / "run").exists()


def test_config_file_with_a_syntax_error_through_the_tool(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("from base import *\ntrain.update(steps=10\n")
    done = run_tool("tools/train.py", path, f"train.run_dir={tmp_path / 'run'}")
    assert_fails_in_one_line(done, 2, f"error: {path}:2: syntax error", "fix that line")
    assert not (tmp_path / "run").exists()
