"""bench/infer_speed.py: the original configuration it builds, and its measure path end to end on tiny models."""
from __future__ import annotations

import queue
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from bench import infer_speed
from bench.infer_speed import ExpertSpec, ModelSpec, Result
from experts import create_expert, save_ensemble
from tests.conftest import write_labelled_set

ORIGINAL_EXPERTS = {"convnextv2_tiny": 2, "efficientnet_b4": 2, "efficientnet_b5": 2, "efficientnet_b6": 1}


def test_original_spec_is_the_seven_timm_experts_at_512():
    spec = infer_speed.original_spec()
    assert spec.weights is None and spec.label == "original"
    assert Counter(e.name for e in spec.experts) == ORIGINAL_EXPERTS
    assert len({e.key for e in spec.experts}) == 7
    for e in spec.experts:
        assert not set(e.overrides) & set(infer_speed.TRAINING_ONLY_KEYS)
    with torch.device("meta"):  # the real architectures, without their memory or init time
        built = [e.build() for e in spec.experts]
    assert {b.config.family for b in built} == {"convnext", "efficientnet"}
    assert all(b.config.input_size == 512 for b in built)
    assert all(p.is_meta for b in built for p in b.parameters())


def test_original_spec_drops_non_timm_experts_and_training_keys(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"experts": [
        {"name": "test_efficientnet", "key": "a", "pretrained": True, "fold": 0, "weight": 2.0, "lr_scale": 3.0,
         "drop_rate": 0.2},
        {"name": "test_clip", "fold": 1},
    ]}))
    spec = infer_speed.original_spec(config)
    assert spec.experts == (ExpertSpec("test_efficientnet", "a", {"drop_rate": 0.2, "input_size": 512}),)


def test_model_spec_needs_exactly_one_source():
    with pytest.raises(ValueError):
        ModelSpec("x")
    with pytest.raises(ValueError):
        ModelSpec("x", weights="w", experts=(ExpertSpec("test_efficientnet", "a"),))


def test_ratio_line_compares_the_fastest_run_of_each():
    def result(label, batch, rate, rss, gpu=None):
        return Result(label, "", ["e"], [224], batch, 4, rate, rss, gpu)

    results = [result("default", 1, 10.0, 500), result("default", 32, 40.0, 800), result("original", 4, 0.2, 4000)]
    line = infer_speed.ratio_line(results)
    assert line == ("default vs original (fastest run of each: batch 32 vs batch 4): "
                    "200x the images/s, 0.2x the peak RSS")
    assert infer_speed.ratio_line(results[:2]) is None
    gpu = infer_speed.ratio_line([result("default", 8, 100.0, 500, 50.0), result("original", 8, 10.0, 1000, 500.0)])
    assert gpu.endswith("10x the images/s, 0.5x the peak RSS, 0.1x the peak GPU memory")


def test_cli_measures_default_and_original_on_the_same_images(tmp_path: Path, capsys):
    weights = save_ensemble({"eff": create_expert("test_efficientnet")}, tmp_path / "weights")
    write_labelled_set(tmp_path / "set", n=3, size=48)
    tiny_original = ModelSpec("original", experts=(ExpertSpec("test_efficientnet", "a", {"input_size": 96}),
                                                   ExpertSpec("test_convnext", "b", {"input_size": 96})))
    rc = infer_speed.main(["--weights", str(weights), "--image-dir", str(tmp_path / "set" / "images"),
                           "--images", "3", "--batch-sizes", "2", "--original-images", "2",
                           "--original-batch-size", "1", "--threads", "1"], original=tiny_original)
    assert rc == 0
    out = capsys.readouterr().out
    runs, experts = markdown_tables(out)
    assert runs[0] == ["model", "experts", "input px", "batch", "images/s", "peak RSS MiB", "peak GPU MiB"]
    rows = runs[2:]
    assert [r[:4] for r in rows] == [["default", "1", "64", "2"], ["original", "2", "96", "1"]]
    assert all(float(r[4]) > 0 and float(r[5]) > 0 and r[6] == "-" for r in rows)
    assert "original: random weights; 1x test_efficientnet, 1x test_convnext" in out
    assert "default vs original (fastest run of each: batch 2 vs batch 1): " in out
    assert "x the images/s" in out and "x the peak RSS" in out

    # Each expert timed alone, per run, then (two or more) their sum; the key names the expert, with its
    # registry name if other.
    assert experts[0] == infer_speed.PER_EXPERT_HEADERS
    rows = experts[2:]
    assert [r[:4] for r in rows] == [
        ["default", "2", "eff (test_efficientnet)", "64"],
        ["original", "1", "a (test_efficientnet)", "96"], ["original", "1", "b (test_convnext)", "96"],
        ["original", "1", "all 2 experts", "96"]]
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)
    shares = [int(r[6].rstrip("%")) for r in rows]
    assert shares[0] == 100 and shares[3] == 100 and 99 <= shares[1] + shares[2] <= 101
    # The sum of the experts' milliseconds per image is the "all experts" row's.
    assert float(rows[3][5]) == pytest.approx(float(rows[1][5]) + float(rows[2][5]), rel=0.02)


def markdown_tables(text: str) -> list[list[list[str]]]:
    """The cells of each Markdown table in ``text`` (header, separator and rows), tables split at other lines."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.split("|")[1:-1]])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_cli_no_per_expert_prints_the_runs_table_only(tmp_path: Path, capsys):
    weights = save_ensemble({"eff": create_expert("test_efficientnet")}, tmp_path / "weights")
    write_labelled_set(tmp_path / "set", n=2, size=48)
    rc = infer_speed.main(["--weights", str(weights), "--image-dir", str(tmp_path / "set" / "images"), "--images", "2",
                           "--batch-sizes", "2", "--no-original", "--no-per-expert", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert len(markdown_tables(out)) == 1 and "per expert" not in out


def test_time_experts_times_each_expert_on_every_readable_image(tmp_path: Path):
    """In-process (no spawn): every expert sees the same readable images, in batches; unreadable ones are skipped."""
    from experts import Ensemble

    write_labelled_set(tmp_path / "set", n=3, size=40)
    paths = infer_speed.sample_images(3, tmp_path / "set" / "images")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    ensemble = Ensemble({"a": create_expert("test_efficientnet"),
                         "b": create_expert("test_clip", input_size=32)}).eval()
    timings = infer_speed.time_experts(ensemble, paths + [str(tmp_path / "broken.jpg")], 2, "cpu")
    assert [(t.key, t.name, t.input_size, t.images) for t in timings] == [
        ("a", "test_efficientnet", 64, 3), ("b", "test_clip", 32, 3)]
    assert all(t.seconds > 0 and t.images_per_s == t.images / t.seconds for t in timings)


def test_per_expert_table_is_absent_without_timings():
    result = Result("default", "", ["e"], [224], 1, 4, 10.0, 500.0, None)
    assert infer_speed.per_expert_table([result]) is None
    assert "per expert" not in infer_speed.report([result])


def test_a_failing_measurement_is_reported_as_text_not_lost(tmp_path: Path):
    """In the child, an exception must reach the parent (which raises it) instead of leaving it waiting.

    ``measure`` runs in-process here, with a plain queue: a spawned process would only add its start-up time.
    """
    write_labelled_set(tmp_path / "set", n=1, size=32)
    paths = infer_speed.sample_images(1, tmp_path / "set" / "images")
    outcome = queue.Queue()
    infer_speed.measure(ModelSpec("broken", weights=str(tmp_path / "no_such_weights")), paths, 1, "cpu", outcome)
    text = outcome.get_nowait()
    assert isinstance(text, str) and "Traceback" in text and "no_such_weights" in text


def test_threads_table_runs_each_setting_in_its_own_process_and_marks_infer_defaults(tmp_path: Path):
    from core.device import default_threads

    torch.manual_seed(0)
    weights = save_ensemble({"eff": create_expert("test_efficientnet")}, tmp_path / "w")
    paths = sorted(str(p) for p in (write_labelled_set(tmp_path / "imgs", n=4).parent / "images").iterdir())
    results = infer_speed.threads_table(ModelSpec("default", weights=str(weights)), paths, batch_size=2,
                                        settings=[(1, 0), (1, 1)], log=lambda m: None)
    assert [(r.threads, r.workers, r.images) for r in results] == [(1, 0, 4), (1, 1, 4)]
    table = infer_speed.threads_report(results).splitlines()
    assert table[0].startswith("| torch threads | loader workers | images/s")
    assert table[2].endswith("| yes |") == (default_threads(0) == 1)
    assert table[3].endswith("| yes |") == (default_threads(1) == 1)
