"""bench/train_speed.py: its spec strings, what each builds, and every timing path end to end on a tiny CLIP."""
from __future__ import annotations

import pytest
import torch

from bench import train_speed
from bench.train_speed import Spec, SpecError, parse_spec

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 8,
        "image_size": 64, "projection_dim": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05}


def test_specs_parse_into_overrides_and_a_mode():
    assert parse_spec("test_clip") == Spec("test_clip", "test_clip", {}, "train")
    assert parse_spec("test_clip:lib:layernorm@32") == Spec(
        "test_clip:lib:layernorm@32", "test_clip",
        {"input_size": 32, "head": "lib", "tuning": "layernorm", "normalize_features": True}, "train")
    assert parse_spec("test_clip:last1").overrides == {"frozen_stages": 1}  # 2 blocks, the last one trains
    assert parse_spec("test_clip:frozen1").overrides == {"frozen_stages": 1}
    assert parse_spec("test_clip:depth1:fwd") == Spec("test_clip:depth1:fwd", "test_clip",
                                                      {"backbone_config": {**TINY, "num_hidden_layers": 1}}, "fwd")
    assert parse_spec("test_clip:depth1:last1").overrides == {  # last K counts in the truncated tower
        "backbone_config": {**TINY, "num_hidden_layers": 1}, "frozen_stages": 0}
    assert parse_spec("test_clip:frozen@48") == Spec("test_clip:frozen@48", "test_clip",
                                                     {"input_size": 48, "normalize_features": True}, "frozen")
    assert parse_spec("test_efficientnet:frozen2").overrides == {"frozen_stages": 2}
    assert train_speed.parse_expert("test_clip:lib:fwd") == ("test_clip", {"head": "lib"})


@pytest.mark.parametrize("text, why", [
    ("no_such_expert", "unknown expert"),
    ("test_clip:bogus", "unknown flag"),
    ("test_clip@x", "input size"),
    ("test_clip@0", "input size"),
    ("test_clip:frozen:fwd", "two modes"),
    ("test_clip:frozen:layernorm", "only apply to training"),
    ("test_clip:fwd:last1", "only apply to training"),
    ("test_clip:last3", "the tower has 2 blocks"),
    ("test_clip:depth1:last2", "the tower has 1 blocks"),
    ("test_clip:last0", "last0"),
    ("test_clip:depth0", "at least one block"),
    ("test_clip:last1:frozen1", "give one"),
    ("test_efficientnet:last1", "CLIP experts only"),
    ("test_efficientnet:depth4", "CLIP experts only"),
])
def test_bad_specs_raise_a_spec_error_naming_them(text, why):
    with pytest.raises(SpecError, match=f"^{text}: .*{why}"):
        parse_spec(text)


def test_the_command_turns_a_bad_spec_into_an_error_line(capsys):
    assert train_speed.main(["test_clip:bogus", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: test_clip:bogus: unknown flag 'bogus'") and "Traceback" not in err


def test_specs_build_what_they_say():
    last = parse_spec("test_clip:last1").build()
    tower = last.tower
    assert not any(p.requires_grad for m in (tower.embeddings, tower.pre_layrnorm, tower.encoder.layers[0])
                   for p in m.parameters())
    assert all(p.requires_grad for m in (tower.encoder.layers[1], last.head) for p in m.parameters())

    ln = parse_spec("test_clip:layernorm@32").build()
    assert ln.config.input_size == 32
    assert all(isinstance(m, torch.nn.LayerNorm) for n, m in ln.named_modules()
               if any(p.requires_grad for p in m.parameters(recurse=False)) and not n.startswith("head"))

    short = parse_spec("test_clip:depth1:fwd").build()
    assert len(short.tower.encoder.layers) == 1 and short.config.backbone_config["num_hidden_layers"] == 1
    logits, _ = short(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 2)


def table_rows(out: str) -> list[list[str]]:
    lines = [line for line in out.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines]
    assert cells[0] == train_speed.HEADERS
    return cells[2:]


def test_cli_times_every_mode_on_a_tiny_clip(capsys):
    rc = train_speed.main(["test_clip:layernorm@32", "test_clip:last1", "test_clip:lib:frozen", "test_clip:depth1:fwd",
                           "--batch-size", "2", "--steps", "1", "--head-rows", "256", "--head-epochs", "1",
                           "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert [r[:4] for r in rows] == [
        ["test_clip:layernorm@32", "train step, CE only", "32", "2"],
        ["test_clip:layernorm@32", "train step, ce+kl_noise+nce", "32", "2"],
        ["test_clip:last1", "train step, CE only", "64", "2"],
        ["test_clip:last1", "train step, ce+kl_noise+nce", "64", "2"],
        ["test_clip:lib:frozen", "frozen tower: forward once per image (token cache)", "64", "2"],
        ["test_clip:lib:frozen", "lib head on cached features (fit_head)", "64", "2"],
        ["test_clip:depth1:fwd", "forward only (inference)", "64", "1"],
    ]
    assert all(float(r[5]) > 0 for r in rows)
    assert all(r[7].endswith("%") and int(r[7].rstrip("%")) >= 0 for r in rows)  # CPU use, on CPU
    trainable = [r[4] for r in rows]
    assert trainable[4] == "0" and trainable[6] == "-"
    assert int(trainable[0].replace(",", "")) < int(trainable[2].replace(",", ""))  # LN-tuning: fewer than a block
    epochs = [r[6] for r in rows]
    assert all(e.endswith((" s", " min", " h")) for e in epochs[:4] + epochs[5:6])
    assert epochs[4].startswith("once: ") and epochs[6] == "-"
    assert "test_clip:lib:frozen, 10,000 images: the token cache once (" in out and "+ 30 head epochs (" in out
    assert "1 torch threads), batch 2, 1 timed steps" in out and "load average before the run " in out


def test_the_older_experts_option_still_works(capsys):
    assert train_speed.main(["--experts", "test_clip:depth1:fwd", "--batch-size", "1", "--steps", "1"]) == 0
    assert [r[0] for r in table_rows(capsys.readouterr().out)] == ["test_clip:depth1:fwd"]


def test_duration_picks_a_readable_unit():
    assert [train_speed.duration(s) for s in (1.234, 89, 90, 3600, 5400, 36000)] == [
        "1.23 s", "89 s", "1.5 min", "60 min", "1.5 h", "10 h"]
