"""A built wheel works away from the checkout: configs and model JSONs are package data."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and runs clip-dro from it

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_the_configs_and_runs_from_anywhere(tmp_path):
    # pip builds in an isolated environment with the setuptools pyproject.toml asks for (a new venv has an older one)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("clip_dro-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    shipped = {p.name for p in (site / "clip_dro/configs").rglob("*") if p.suffix in (".yaml", ".json")}
    expected = {p.name for p in (ROOT / "configs").rglob("*") if p.suffix in (".yaml", ".json")}
    assert shipped == expected and "tiny_cpu.yaml" in shipped
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    work = tmp_path / "work"
    work.mkdir()

    def clip_dro(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "clip_dro.cli", *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    where = subprocess.run([sys.executable, "-c", "import clip_dro; print(clip_dro.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    assert "usage: clip-dro quickstart" in clip_dro("quickstart", "--help")
    clip_dro("prep", "synthetic", "--output", "data", "--num-train", "480")
    clip_dro("train", "--config", "tiny_cpu", "data.train=data/train", "train.max_steps=2", "eval.retrieval=[]",
             "eval.zeroshot=[]")
    assert (work / "runs/tiny_cpu/final/model.pt").is_file()
    clip_dro("bench", "--quick", "--output", "bench.json")
    assert (work / "bench.json").is_file()
