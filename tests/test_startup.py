"""Fast start of ``python infer.py IMAGE`` (issue #12), checked by structure, not by a stopwatch.

Scoring an image with the shipped weights must not import what it does not use: transformers (the CLIP tower
is plain torch, experts/clip_tower.py), timm and torchvision (no timm family in the folder: the registry
imports families lazily), albumentations (the scoring resize is OpenCV, core/transforms.py) or scikit-learn.
Each of these costs 1 to 3 s of start-up; ``bench/startup.py`` times the commands.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import startup

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("transformers", "timm", "albumentations", "sklearn", "torchvision")

SCORE_ONE = """
import sys
import infer
code = infer.main([sys.argv[1], "--quiet"])
heavy = sorted(m for m in sys.argv[2].split(",") if m in sys.modules)
print("RESULT", code, ",".join(heavy) or "-")
"""


def base_cache_file() -> Path:
    """Where experts/base_weights.py caches the shipped model's base (without importing the project)."""
    if os.environ.get("DEEPFAKE_DETECTOR_CACHE"):
        folder = Path(os.environ["DEEPFAKE_DETECTOR_CACHE"])
    else:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deepfake-detector"
    return folder / "clip_vit_b16_openai.safetensors"


@pytest.mark.skipif(not base_cache_file().is_file(),
                    reason="the shipped model's base is not cached (python -m experts.fetch)")
def test_scoring_an_image_with_the_shipped_weights_imports_no_heavy_library():
    image = ROOT / "demo" / "dfdc_fake_1.jpg"
    result = subprocess.run([sys.executable, "-c", SCORE_ONE, str(image), ",".join(HEAVY)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    lines = result.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("RESULT 0 "), result.stderr[-3000:]
    prob, verdict, name = lines[-2].split("\t")
    expected = {row.split(",")[0]: float(row.split(",")[1])
                for row in (ROOT / "demo" / "scores.csv").read_text().splitlines()[1:]}
    assert abs(float(prob) - expected[image.name]) < 1e-4 and verdict == "fake" and name == str(image)
    assert lines[-1] == "RESULT 0 -", f"scoring one image imported {lines[-1].split()[-1]}"


def test_loading_a_clip_folder_imports_only_the_clip_family(tmp_path):
    """A weights folder imports the families it uses, not every family the registry knows."""
    code = f"""
import sys
import torch
from experts import create_expert, load_ensemble, save_ensemble
save_ensemble({{"c": create_expert("test_clip")}}, {str(tmp_path / "w")!r})
load_ensemble({str(tmp_path / "w")!r})(({{64: torch.rand(1, 3, 64, 64)}}))
print(sorted(m for m in ("timm", "torchvision", "transformers", "experts.efficientnet", "experts.convnext")
             if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_startup_bench_times_one_run_of_one_command(tmp_path):
    cases = startup.select(startup.default_cases(), ["infer.py --help"])
    assert [c.kind for c in cases] == ["torch", "help"]
    cases = startup.measure(cases[1:], runs=1)  # no timing asserted: one run of `python infer.py --help`
    assert len(cases[0].times) == 1 and cases[0].times[0] > 0
    baseline = startup.Case('python -c "import torch"', ("-c", "pass"), "torch", times=[1.0])
    table = startup.format_table([baseline, *cases], threads=2, load=(0.5, 0.5, 0.5))
    assert "| `python infer.py --help` |" in table and "torch threads 2" in table and "< 2 s" in table
    assert startup.missed([baseline, startup.Case("x", ("x",), "image", times=[2.5])])[0].label == "x"
    labels = [c.label for c in startup.default_cases()]
    assert "python -m experts.fetch --help" in labels and any("evaluation/" in label for label in labels)
    with pytest.raises(RuntimeError, match="exited with 3"):
        startup.time_once(["-c", "raise SystemExit(3)"])
