"""The planner is arithmetic over configs: it runs where torch and pandas cannot be imported."""

import subprocess
import sys

import pytest

BLOCKED = "import sys; sys.modules['torch'] = None; sys.modules['pandas'] = None\n"


@pytest.mark.parametrize("argv", [["--pair", "llama8b", "--gpu", "h100"], ["--table"]])
def test_plan_runs_without_torch_and_pandas(argv):
    script = BLOCKED + (
        "import runpy\n"
        f"sys.argv = ['lens_compare.plan', *{argv!r}]\n"
        "try:\n    runpy.run_module('lens_compare.plan', run_name='__main__')\n"
        "except SystemExit as exit_:\n    code = exit_.code\n"
        "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None], 'torch was imported'\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("llama8b" in done.stdout or "Llama" in done.stdout) and "Traceback" not in done.stderr


def test_the_blocker_really_blocks():
    done = subprocess.run([sys.executable, "-c", BLOCKED + "import torch"], capture_output=True, text=True)
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr


def test_import_lens_compare_is_light():
    script = ("import sys, lens_compare\n"
              "heavy = [m for m in ('torch', 'pandas', 'transformers') if m in sys.modules]\n"
              "assert not heavy, heavy\n"
              "assert callable(lens_compare.load_run)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
