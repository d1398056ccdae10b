"""What installing gpt2-scratch adds to a user's environment: one importable name, ``gpt2_scratch``.

The wheel (``pip install .``, not editable) goes into a fresh virtual environment; the dependencies come
from this environment's site-packages through a path file (a real reinstall of torch would take minutes).
From a folder holding ``core.py``, ``train.py``, ``eval.py`` and ``convert.py``, the names a user's own
project is likely to have, the model imports and the command line runs.
"""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT


@pytest.mark.slow  # builds a wheel and a virtual environment, then three fresh interpreters
def test_the_wheel_adds_only_gpt2_scratch_and_works_beside_a_users_train_py(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO_ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = dist.glob("gpt2_scratch-*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top_level == {"gpt2_scratch", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    with zipfile.ZipFile(wheel) as archive:  # what pip does for a pure-Python wheel, without pip in the venv
        archive.extractall(site)
    (venv / "bin" / "gpt2-scratch").write_text(
        f"#!{python}\nimport sys\nfrom gpt2_scratch.core.cli import main\nsys.exit(main())\n")
    (venv / "bin" / "gpt2-scratch").chmod(0o755)
    # The dependencies (torch, transformers, ...): this environment's site-packages, as plain paths, so its
    # editable install of this checkout is not seen.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    user = tmp_path / "project"
    user.mkdir()
    for name in ("core.py", "train.py", "eval.py", "convert.py"):
        (user / name).write_text("raise SystemExit('the user\\'s own module was imported')\n")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    check = ("import gpt2_scratch, sys; from gpt2_scratch import GPT2ScratchForCausalLM, GPT2ScratchConfig; "
             "m = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset('gpt2-small', n_layers=1, emb_dim=32, "
             "n_heads=2, context_length=16)); print(gpt2_scratch.__file__, type(m).__name__)")
    result = subprocess.run([str(python), "-c", check], cwd=user, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(site / "gpt2_scratch" / "__init__.py"), "GPT2ScratchForCausalLM"]
    for argv in (["gpt2-scratch", "--help"], [str(python), "-m", "gpt2_scratch", "sft", "--help"]):
        result = subprocess.run(argv, cwd=user, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "usage:" in result.stdout
