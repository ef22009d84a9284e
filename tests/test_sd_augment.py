"""SD augmentation with tiny random pipelines saved to disk and loaded the way a user's checkpoint is.

Like diffusers' ``get_dummy_components``: a 2-block UNet, a 2-block VAE and a 2-layer CLIP text encoder,
with a byte-level CLIP tokenizer written offline (no hub), run for 2 steps at 32 px.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from data_prep import sd_augment as sda
from core.labels import read_labels, split_by_group
from tests.conftest import ROOT, write_labelled_set
from tests.distributed_utils import output_tail, run_torchrun

torch.set_num_threads(1)
SIZE = 32


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes: the base alphabet of a byte-level BPE vocabulary."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokenizer(folder: Path):
    """A CLIP tokenizer from a 514-token vocab.json (bytes, bytes + "</w>", the two specials) and no merges."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def dummy_components(tmp: Path, unet_in_channels: int = 4) -> dict:
    """The pieces of a Stable Diffusion pipeline, tiny and seeded (cf. diffusers' get_dummy_components)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(tmp / "tokenizer_files")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 2, in_channels=unet_in_channels,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=(2, 4))
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], sample_size=SIZE)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    """A plain (img2img) and an inpainting (9-channel UNet) pipeline, saved as a user's folders would be."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    tmp = tmp_path_factory.mktemp("models")
    StableDiffusionImg2ImgPipeline(**dummy_components(tmp)).save_pretrained(tmp / "sd")
    StableDiffusionInpaintPipeline(**dummy_components(tmp, unet_in_channels=9)).save_pretrained(tmp / "sd_inpaint")
    return {"sd": tmp / "sd", "inpaint": tmp / "sd_inpaint"}


@pytest.fixture
def real_set(tmp_path) -> Path:
    """4 labelled images (2 real, 2 fake) in 2 groups; only the reals are sources."""
    return write_labelled_set(tmp_path / "set", n=4, size=40)


def _config(models: dict[str, Path], **overrides) -> sda.AugmentConfig:
    base = dict(model=str(models["sd"]), inpaint_model=str(models["inpaint"]), strengths=(0.5,),
                inpaint_strengths=(1.0,), masks=("ellipse", "box"), steps=2, size=SIZE, batch_size=2, device="cpu",
                prompt="a face", negative_prompt="blurry", seed=3)
    return sda.AugmentConfig(**{**base, **overrides})


def test_writes_images_masks_metadata_and_labels_then_resumes(saved_models, real_set, tmp_path):
    out = tmp_path / "out"
    cfg = _config(saved_models)
    s = sda.augment(real_set, out, cfg, progress=False)
    assert (s.written, s.skipped, s.failed) == (6, 0, [])  # 2 reals x (1 img2img + 2 inpaint masks)

    df = read_labels(s.labels)
    assert list(df.columns[:12]) == ["img_name", "target", "group", "source", "prompt", "negative_prompt", "seed",
                                     "steps", "guidance", "strength", "model", "origin"]
    assert (df["target"] == 1).all() and len(df) == 6
    assert sorted(df["source"].unique()) == ["sd-img2img", "sd-inpaint"]
    reals = pd.read_csv(real_set).query("target == 0")
    assert set(df["group"]) == set(reals["group"])  # each fake keeps its real's group
    for _, row in df.iterrows():
        with Image.open(row["path"]) as im:
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"
        assert (out / row["origin"]).resolve() == (real_set.parent / row["origin_name"]).resolve()
        assert row["origin_name"] in set(reals["img_name"])
        meta = json.loads((out / "meta" / (Path(row["img_name"]).stem + ".json")).read_text())
        assert meta["prompt"] == "a face" and meta["steps"] == 2 and meta["guidance"] == 7.5
        if row["source"] == "sd-inpaint":
            assert row["model"] == str(saved_models["inpaint"]) and row["strength"] == "1.0"
            mask = np.asarray(Image.open(out / row["mask"]))
            assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) == {0, 255}
        else:
            assert row["model"] == str(saved_models["sd"]) and row["strength"] == "0.5"
    train, val = split_by_group(pd.concat([df, read_labels(real_set)]), 0.5)
    assert not set(train["group"]) & set(val["group"])

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    (out / "labels.csv").unlink()
    s2 = sda.augment(real_set, out, cfg, pipes={}, progress=False)  # nothing to do: must not need a pipeline
    assert (s2.written, s2.skipped, s2.mixed_settings) == (0, 6, 0)
    assert {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes
    assert len(pd.read_csv(out / "labels.csv")) == 6

    (out / "meta" / f"{Path(df['img_name'][0]).stem}.json").unlink()  # as if killed before its metadata
    s3 = sda.augment(real_set, out, _config(saved_models, prompt="other"), progress=False)
    assert (s3.written, s3.skipped, s3.mixed_settings) == (1, 5, 5)


def test_same_seed_same_images_other_seed_other_images(saved_models, real_set, tmp_path):
    cfg = _config(saved_models, modes=("img2img",), strengths=(1.0,))
    pipes = sda.load_pipelines(cfg, torch.device("cpu"))
    runs = {}
    for name, seed, batch in (("a", 3, 2), ("b", 3, 1), ("c", 4, 2)):
        sda.augment(real_set, tmp_path / name, sda.AugmentConfig(**{**cfg.__dict__, "seed": seed,
                                                                    "batch_size": batch}), pipes, progress=False)
        runs[name] = [np.asarray(Image.open(p), dtype=int) for p in sorted((tmp_path / name / "images").iterdir())]
    assert len(runs["a"]) == 2
    for a, b, c in zip(runs["a"], runs["b"], runs["c"]):
        assert np.abs(a - b).max() <= 1  # batch composition does not change an image (up to rounding)
        assert np.abs(a - c).mean() > 1


def test_inpaint_shares_the_img2img_pipeline_and_can_paste_back(saved_models, real_set, tmp_path):
    cfg = _config(saved_models, inpaint_model=None, masks=("box",), paste_back=True)
    pipes = sda.load_pipelines(cfg, torch.device("cpu"))
    assert pipes["inpaint"].unet is pipes["img2img"].unet  # loaded once
    s = sda.augment(real_set, tmp_path / "out", cfg, pipes, progress=False)
    df = read_labels(s.labels).query("source == 'sd-inpaint'")
    assert len(df) == 2 and df["paste_back"].eq("True").all()
    for _, row in df.iterrows():
        mask = np.asarray(Image.open(tmp_path / "out" / row["mask"])) > 0
        fake = np.asarray(Image.open(row["path"]), dtype=int)
        real = sda.prepare_image(str((tmp_path / "out" / row["origin"]).resolve()), SIZE).astype(int)
        far = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)) == 0  # beyond the feathered edge
        assert np.abs(fake - real)[far].max() <= 1 and np.abs(fake - real)[mask].mean() > 1


@pytest.mark.parametrize("overrides, message", [
    (dict(modes=("txt2img",)), "--mode"),
    (dict(size=30), "multiple of 8"),
    (dict(strengths=(0.3,)), "no denoising step"),
    (dict(masks=("circle",)), "--masks"),
])
def test_bad_options_are_refused_by_name(saved_models, overrides, message):
    with pytest.raises(sda.AugmentError, match=message):
        sda.check_config(_config(saved_models, **overrides))


def test_an_inpainting_checkpoint_cannot_do_img2img(saved_models):
    cfg = _config(saved_models, model=str(saved_models["inpaint"]), modes=("img2img",))
    with pytest.raises(sda.AugmentError, match="in_channels=9"):
        sda.load_pipelines(cfg, torch.device("cpu"))


def test_cli_runs_from_the_repo_root_as_written():
    """The script puts the repo root on sys.path itself (diffusers is imported only when a run needs it)."""
    r = subprocess.run([sys.executable, "data_prep/sd_augment.py", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "--no-safety-checker" in r.stdout, r.stderr


def test_cli(saved_models, real_set, tmp_path, capsys):
    out = tmp_path / "cli"
    args = [str(real_set), "--model", str(saved_models["sd"]), "--out", str(out), "--mode", "img2img",
            "--strengths", "0.5,1.0", "--steps", "2", "--size", str(SIZE), "--batch-size", "4", "--device", "cpu",
            "--limit", "1", "--quiet", "--no-safety-checker"]
    assert sda.main(args) == 0
    err = capsys.readouterr().err
    assert "safety checker is disabled" in err and "2 images written" in err
    df = pd.read_csv(out / "labels.csv")
    assert sorted(df["strength"]) == [0.5, 1.0] and df["origin_name"].nunique() == 1
    assert sda.main(args[:-2] + ["--strengths", "0.1"]) == 2 and "no denoising step" in capsys.readouterr().err


@pytest.mark.skipif(not sda.has_detector(), reason="yuface not installed")
def test_face_mask_sits_on_the_face_and_falls_back_to_the_central_ellipse():
    dfdc = ROOT.parent / "shared" / "data" / "dfdc_faces"
    grey = np.full((64, 64, 3), 128, np.uint8)
    mask, kind = sda.make_mask(grey, "face", seed=0)
    assert kind == "ellipse" and mask[35, 32] == 255 and mask[2, 2] == 0
    box, kind = sda.make_mask(grey, "box", seed=0)
    assert kind == "box" and 0.0625 <= (box > 0).mean() <= 0.25
    assert np.array_equal(box, sda.make_mask(grey, "box", seed=0)[0])
    if not (dfdc / "images").is_dir():
        pytest.skip(f"{dfdc}/images not found")
    name = pd.read_csv(dfdc / "labels.csv").query("target == 0")["img_name"].iloc[0]
    face = sda.prepare_image(str(dfdc / name), 128)
    mask, kind = sda.make_mask(face, "face", seed=0)
    x, y, w, h = sda.largest_face(face).box
    ys, xs = np.nonzero(mask)
    assert kind == "face" and x <= xs.min() and xs.max() <= x + w and y <= ys.min() and ys.max() <= y + h


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_in_fp16(saved_models, real_set, tmp_path):
    cfg = _config(saved_models, device="cuda")
    pipes = sda.load_pipelines(cfg, torch.device("cuda"))
    assert all(p.unet.dtype == torch.float16 and p.device.type == "cuda" for p in pipes.values())
    s = sda.augment(real_set, tmp_path / "out", cfg, pipes, progress=False)
    df = read_labels(s.labels)
    assert s.written == 6 and (df["dtype"] == "float16").all()
    assert all(np.asarray(Image.open(p)).std() > 0 for p in df["path"])  # no NaN-black images


def test_face_masks_without_the_detector_are_refused_up_front(saved_models, monkeypatch):
    monkeypatch.setattr(sda, "has_detector", lambda: False)
    with pytest.raises(sda.AugmentError, match="--masks face needs"):
        sda.check_config(_config(saved_models, masks=("face",)))
    sda.check_config(_config(saved_models, masks=("ellipse",)))


# ----------------------------------------------------------------------------------------------- torchrun
def _cli_args(models: dict[str, Path], real_set: Path, out: Path) -> list[str]:
    """Both modes (2 reals x (1 img2img + 2 inpainting masks) = 6 jobs), tiny, on the CPU."""
    return [str(real_set), "--model", str(models["sd"]), "--inpaint-model", str(models["inpaint"]), "--out", str(out),
            "--mode", "img2img,inpaint", "--strengths", "0.5", "--masks", "ellipse,box", "--steps", "2", "--size",
            str(SIZE), "--batch-size", "2", "--device", "cpu", "--seed", "3", "--prompt", "a face", "--quiet"]


def _images(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=int) for p in sorted((out / "images").iterdir())}


def test_torchrun_two_processes_make_the_same_outputs_as_one(saved_models, real_set, tmp_path, capsys):
    assert sda.main(_cli_args(saved_models, real_set, tmp_path / "one")) == 0
    proc = run_torchrun(["data_prep/sd_augment.py", *_cli_args(saved_models, real_set, tmp_path / "two")])
    assert proc.returncode == 0, output_tail(proc)
    assert proc.stderr.count("6 images written (3 + 3 by 2 processes), 0 already there") == 1  # rank 0 alone
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "two" / "labels.csv"),
                                  pd.read_csv(tmp_path / "one" / "labels.csv"))
    one, two = _images(tmp_path / "one"), _images(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 6
    for name in one:
        assert np.abs(one[name] - two[name]).max() <= 1, name  # other batches, same seeds: up to rounding


def test_torchrun_remakes_only_what_a_killed_run_left_undone(saved_models, real_set, tmp_path, capsys):
    out = tmp_path / "out"
    assert sda.main(_cli_args(saved_models, real_set, out)) == 0
    before = _images(out)
    metas = sorted((out / "meta").glob("*.json"))
    for meta in metas[::2]:  # as if killed before these three were finished
        meta.unlink()
    (out / "labels.csv").unlink()
    proc = run_torchrun(["data_prep/sd_augment.py", *_cli_args(saved_models, real_set, out)])
    assert proc.returncode == 0, output_tail(proc)
    assert "3 images written (2 + 1 by 2 processes), 3 already there" in proc.stderr
    assert len(pd.read_csv(out / "labels.csv")) == 6
    after = _images(out)
    assert after.keys() == before.keys()
    for name in before:
        assert np.abs(after[name] - before[name]).max() <= 1, name
