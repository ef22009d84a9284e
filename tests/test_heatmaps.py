"""Fake-class heat maps (scoring/heatmaps.py) and ``infer.py --heatmap``, on tiny random experts of every family."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import infer
from experts import Ensemble, create_expert, save_ensemble
from scoring import heatmaps as hm
from tests.conftest import write_labelled_set


def _experts() -> dict:
    torch.manual_seed(0)
    return {"eff": create_expert("test_efficientnet"), "cnx": create_expert("test_convnext"),
            "clip": create_expert("test_clip", head="lib"), "clip_cls": create_expert("test_clip")}


@pytest.fixture(scope="module")
def ensemble() -> Ensemble:
    return Ensemble(_experts(), weights={"eff": 3.0, "cnx": 1.0, "clip": 2.0, "clip_cls": 2.0}).eval()


def _image(seed: int = 1, height: int = 90, width: int = 120) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def maps(ensemble) -> dict[str, np.ndarray]:
    return hm.expert_heatmaps(ensemble, _image())


def test_a_map_per_expert_and_their_average_in_unit_range(ensemble, maps):
    assert list(maps) == [*ensemble.names, "ensemble"]
    for name, heat in maps.items():
        assert heat.shape == (64, 64) and heat.dtype == np.float32, name
        assert heat.min() >= 0.0 and heat.max() <= 1.0, name
    for name in ensemble.names:  # grad-cam's min-max scaling: each map spans [0, 1] (here none is flat, all 0)
        assert maps[name].max() == pytest.approx(1.0, abs=1e-3) and maps[name].min() == pytest.approx(0.0, abs=1e-3)
    assert hm.expert_heatmaps(ensemble, _image(), size=100)["clip"].shape == (100, 100)


def test_the_average_is_the_ensemble_weighted_mean(ensemble, maps):
    w = {"eff": 3 / 8, "cnx": 1 / 8, "clip": 2 / 8, "clip_cls": 2 / 8}
    expected = sum(w[name] * maps[name] for name in ensemble.names)
    np.testing.assert_allclose(maps["ensemble"], expected, atol=1e-6)


def test_the_overlay_is_an_rgb_image_of_the_crop(ensemble, maps):
    image = _image()
    crop = hm.display_crop(ensemble, image)
    assert crop.shape == (64, 64, 3)
    picture = hm.overlay(crop, maps["ensemble"])
    assert picture.shape == crop.shape and picture.dtype == np.uint8
    assert not np.array_equal(picture, crop)  # coloured
    np.testing.assert_array_equal(hm.overlay(image, maps["ensemble"]), picture)  # a whole image is cut first


def test_the_map_depends_on_the_image(ensemble, maps):
    other = hm.expert_heatmaps(ensemble, _image(seed=2))
    for name in ensemble.names:
        assert np.abs(other[name] - maps[name]).mean() > 0.02, name


def _quadrant_means(heat: np.ndarray) -> np.ndarray:
    h = heat.shape[0] // 2
    return np.array([[heat[:h, :h].mean(), heat[:h, h:].mean()], [heat[h:, :h].mean(), heat[h:, h:].mean()]])


def _bright_square(corner: str) -> np.ndarray:
    """64 x 64: dark smooth background, a bright noisy square in one corner."""
    rng = np.random.default_rng(3)
    image = np.full((64, 64, 3), 40, np.uint8)
    square = rng.integers(150, 256, (28, 28, 3), dtype=np.uint8)
    if corner == "top-left":
        image[2:30, 2:30] = square
    else:
        image[34:62, 34:62] = square
    return image


def test_the_map_lights_up_where_the_head_finds_its_evidence():
    """A CNN whose fake logit reads one feature channel (a head set by hand): the map is hot where that channel
    fires, top left when the bright square is top left, bottom right when it is there."""
    torch.manual_seed(0)
    expert = create_expert("test_efficientnet").eval()
    images = {c: _bright_square(c) for c in ("top-left", "bottom-right")}
    with torch.no_grad():
        feats = {c: expert.backbone.forward_features(expert.normalize(torch.from_numpy(im).permute(2, 0, 1)[None] / 255))[0]
                 for c, im in images.items()}  # [C, 2, 2] at 64 px
    # a channel that fires most under the square in both images
    fits = [c for c in range(feats["top-left"].shape[0])
            if feats["top-left"][c].argmax() == 0 and feats["bottom-right"][c].argmax() == 3
            and feats["top-left"][c, 0, 0] > 0 and feats["bottom-right"][c, 1, 1] > 0]
    assert fits
    channel = max(fits, key=lambda c: float(feats["top-left"][c, 0, 0] + feats["bottom-right"][c, 1, 1]))
    with torch.no_grad():
        expert.head.weight.zero_()
        expert.head.bias.zero_()
        expert.head.weight[1, channel] = 1.0
    ensemble = Ensemble({"eff": expert})
    corner = {"top-left": (0, 0), "bottom-right": (1, 1)}
    for c, image in images.items():
        quads = _quadrant_means(hm.expert_heatmaps(ensemble, image)["eff"])
        assert np.unravel_index(quads.argmax(), quads.shape) == corner[c], (c, quads)


@pytest.mark.parametrize("head", ["lib", "linear"])
def test_the_clip_map_is_read_off_the_patch_grid(head):
    """CLIP: ``layer_norm1`` of the last block the head reads, its patch tokens laid out row-major (patch
    ``(i, j)`` is token ``1 + i * side + j``; the class token, token 0, left out)."""
    torch.manual_seed(0)
    expert = create_expert("test_clip", head=head, feature_layers=[1])
    layer, reshape = hm.cam_layer(expert)
    assert layer is expert.tower.encoder.layers[0].layer_norm1
    side = 64 // 8
    tokens = torch.zeros(2, 1 + side * side, 3)
    tokens[:, 0] = -1.0
    for i in range(side):
        for j in range(side):
            tokens[:, 1 + i * side + j] = torch.tensor([i, j, 7.0])
    grid = reshape(tokens)
    assert grid.shape == (2, 3, side, side) and (grid[:, 2] == 7).all()  # no class token
    assert all(grid[0, 0, i, j] == i and grid[0, 1, i, j] == j for i in range(side) for j in range(side))


def test_the_cnn_layers_are_the_last_stage():
    torch.manual_seed(0)
    eff, cnx = create_expert("test_efficientnet"), create_expert("test_convnext")
    assert hm.cam_layer(eff) == (eff.backbone.bn2, None)
    assert hm.cam_layer(cnx) == (cnx.backbone.stages[-1], None)


def test_making_maps_leaves_the_experts_as_they_were():
    experts = _experts()
    experts["eff"].train()  # a model in the middle of training
    experts["clip"].freeze_stages()
    for p in experts["clip"].tower.parameters():  # a frozen tower, a trainable head
        p.requires_grad_(False)
    before = {name: ([(n, p.requires_grad) for n, p in e.named_parameters()], [m.training for m in e.modules()],
                     {k: v.clone() for k, v in e.state_dict().items()}) for name, e in experts.items()}
    experts["cnx"].head.weight.grad = torch.ones_like(experts["cnx"].head.weight)  # gradients being accumulated
    hm.expert_heatmaps(Ensemble(experts), _image())
    for name, e in experts.items():
        flags, modes, state = before[name]
        assert [(n, p.requires_grad) for n, p in e.named_parameters()] == flags, name
        assert [m.training for m in e.modules()] == modes, name
        assert all(torch.equal(v, state[k]) for k, v in e.state_dict().items()), name  # BatchNorm statistics too
        grads = [n for n, p in e.named_parameters() if p.grad is not None]
        assert grads == (["head.weight"] if name == "cnx" else []), name
    assert torch.equal(experts["cnx"].head.weight.grad, torch.ones_like(experts["cnx"].head.weight))


def test_heatmap_png_is_the_averaged_overlay(ensemble):
    import io

    data = hm.heatmap_png(ensemble, _image())
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    picture = np.asarray(Image.open(io.BytesIO(data)))
    expected = hm.overlay(hm.display_crop(ensemble, _image()), hm.expert_heatmaps(ensemble, _image())["ensemble"])
    np.testing.assert_array_equal(picture, expected)


def test_with_crop_faces_the_maps_lie_on_the_square_scoring_cuts(ensemble):
    """No face in noise: scoring takes the face crop's fallback, the centre square, and so do the maps."""
    image = _image()
    from scoring.heatmaps import scored_image

    assert scored_image(ensemble, image, crop_faces=True).shape == (64, 64, 3)  # the crop at the largest input size
    maps = hm.expert_heatmaps(ensemble, image, crop_faces=True)
    assert all(m.shape == (64, 64) for m in maps.values())
    assert hm.display_crop(ensemble, image, crop_faces=True).shape == (64, 64, 3)


def test_maps_under_inference_mode_too(ensemble):
    with torch.inference_mode():  # a caller's scoring context must not break the gradients
        assert hm.expert_heatmaps(ensemble, _image())["eff"].max() > 0.5


# ------------------------------------------------------------------------------------------ infer.py --heatmap
@pytest.fixture
def tiny_weights(tmp_path):
    torch.manual_seed(0)
    experts = {"eff": create_expert("test_efficientnet"), "clip": create_expert("test_clip", head="lib")}
    return save_ensemble(experts, tmp_path / "weights")


def test_infer_writes_a_heatmap_per_image_and_expert(tiny_weights, tmp_path, capsys):
    folder = write_labelled_set(tmp_path / "imgs", n=3).parent / "images"
    (folder / "broken.jpg").write_text("not an image")
    images = [str(p) for p in sorted(folder.glob("*.jpg"))]
    args = images + ["--weights", str(tiny_weights), "--quiet"]
    assert infer.main(args) == 1
    plain = capsys.readouterr()
    out = tmp_path / "maps"
    assert infer.main(args + ["--heatmap", str(out)]) == 1
    with_maps = capsys.readouterr()
    assert with_maps.out == plain.out  # the scores are printed as before
    assert "broken.jpg: not an image file" in with_maps.err and "1 of 4 images could not be scored" in with_maps.err
    assert f"heatmaps of 3 images written to {out}" in with_maps.err
    expected = sorted(f"{i:03d}.{kind}heatmap.png" for i in range(3) for kind in ("", "eff.", "clip."))
    assert sorted(p.name for p in out.iterdir()) == expected  # none for the unreadable image, no temporary files
    for p in out.iterdir():
        with Image.open(p) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)


def test_infer_heatmaps_with_a_submission_and_same_named_images(tiny_weights, tmp_path, capsys):
    root = tmp_path / "set"
    for sub in ("a", "b"):
        (root / sub).mkdir(parents=True)
        Image.fromarray(_image(seed=len(sub))).save(root / sub / "x.png")
    sub_csv, out = tmp_path / "sub.csv", tmp_path / "maps"
    assert infer.main([str(root), "--weights", str(tiny_weights), "--submission", str(sub_csv), "--quiet",
                       "--heatmap", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{stem}.{kind}heatmap.png" for stem in ("x", "x-2") for kind in ("", "eff.", "clip."))
    assert sub_csv.read_text().count("\n") == 3


def test_infer_heatmaps_skip_videos_with_a_note(tiny_weights, tmp_path, capsys):
    pytest.importorskip("av")
    from tests.test_video import moving_frames, write_video

    video = write_video(tmp_path / "clip.mp4", moving_frames())
    image = tmp_path / "still.png"
    Image.fromarray(_image()).save(image)
    out = tmp_path / "maps"
    assert infer.main([str(image), str(video), "--weights", str(tiny_weights), "--quiet", "--heatmap", str(out)]) == 0
    captured = capsys.readouterr()
    assert [line.split("\t")[2] for line in captured.out.splitlines()] == [str(image), str(video)]
    assert "heatmaps of 1 image written" in captured.err and "none for 1 video (images only)" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["still.clip.heatmap.png", "still.eff.heatmap.png",
                                                     "still.heatmap.png"]
