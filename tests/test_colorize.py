"""colorize.py: Lab conversion, the colorfulness reward, the metrics, the folder loader, the CLI.
Run: python -m pytest -q tests/test_colorize.py"""
import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import colorize
import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def img(rgb, h=4, w=4):  # one colour (3,) in [0, 1] -> (1, 3, h, w)
    return torch.tensor(rgb, dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, h, w).clone()


@pytest.mark.parametrize("rgb, lab", [
    # published sRGB (D65) -> CIE Lab values (Lindbloom's calculator; the same in colormath and skimage)
    ((1, 0, 0), (53.2408, 80.0925, 67.2032)),
    ((0, 1, 0), (87.7347, -86.1827, 83.1793)),
    ((0, 0, 1), (32.2970, 79.1875, -107.8602)),
    ((1, 1, 1), (100.0, 0.0, 0.0)),
    ((0, 0, 0), (0.0, 0.0, 0.0)),
    ((128 / 255, 128 / 255, 128 / 255), (53.5850, 0.0, 0.0)),
])
def test_lab_matches_reference_values(rgb, lab):
    L, a, b = colorize.srgb_to_lab(img(rgb))
    assert abs(L[0, 0, 0] - lab[0]) < 0.02 and abs(a[0, 0, 0] - lab[1]) < 0.03 and abs(b[0, 0, 0] - lab[2]) < 0.03


def test_lab_inverts_the_worlds_colours():
    # the world's colours are sRGB of Lab L*=62, chroma 42 at the HUES angles: converting back finds them
    for name, h in common.HUES.items():
        if name == "teal":  # out of the sRGB gamut at this lightness: clipped, so not invertible
            continue
        L, a, b = colorize.srgb_to_lab(img(common.COLORS[name]))
        assert abs(L[0, 0, 0] - 62) < 0.1 and abs(math.hypot(a[0, 0, 0], b[0, 0, 0]) - 42) < 0.2
        assert abs(math.degrees(math.atan2(b[0, 0, 0], a[0, 0, 0])) % 360 - h) < 0.3


def test_gray_keeps_lightness_and_hides_hue():
    x = torch.cat([img(common.COLORS[n]) for n in common.HUES if n != "teal"])
    g = colorize.to_gray(x)
    L, a, b = colorize.srgb_to_lab(g)
    assert (L - 62).abs().max() < 0.1 and a.abs().max() < 1e-3 and b.abs().max() < 1e-3  # same L*, no colour
    assert (g - g[0]).abs().max() < 1e-3  # every hue gives the same gray
    gray = img((0.3, 0.3, 0.3))
    torch.testing.assert_close(colorize.to_gray(gray), gray)  # gray stays gray


def test_colorfulness_constructed_images():
    score, vivid, ent = colorize.colorfulness(img((0.5, 0.5, 0.5)).float())
    assert score.item() == 0 and vivid.item() == 0  # all gray: no vivid pixel
    score, vivid, ent = colorize.colorfulness(img((0.9, 0.1, 0.1)).float())
    assert vivid.item() == 1 and ent.item() == 0 and score.item() == 0  # one vivid hue: entropy 0
    # 7 stripes whose hues sit at the centres of the 7 bins over (-pi, pi], chroma 25 at L*=60 (in gamut)
    stripes = []
    for j in range(7):
        h = -math.pi + (j + 0.5) * 2 * math.pi / 7
        stripes.append(colorize.lab_to_srgb(60.0, 25 * math.cos(h), 25 * math.sin(h)))
    x = torch.tensor(np.repeat(np.stack(stripes)[None], 3, 0), dtype=torch.float32).permute(2, 0, 1)[None]
    score, vivid, ent = colorize.colorfulness(x)  # (1, 3, 3, 7)
    assert vivid.item() == 1 and abs(ent.item() - math.log(7)) < 1e-6 and abs(score.item() - math.log(7)) < 1e-6
    # half the pixels gray, the other half two vivid hues in equal parts: 0.5 x entropy(1/2 gray bin, 1/4, 1/4)
    x = torch.cat([img((0.5, 0.5, 0.5), 2, 4), img((0.9, 0.1, 0.1), 1, 4), img((0.1, 0.2, 0.9), 1, 4)], 2).float()
    score, vivid, ent = colorize.colorfulness(x)
    expect = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert vivid.item() == 0.5 and abs(ent.item() - expect) < 1e-6 and abs(score.item() - 0.5 * expect) < 1e-6


def test_reward_scores_each_sample():
    a = torch.cat([img((0.5, 0.5, 0.5)), img((0.9, 0.1, 0.1))]).float()  # (2, 3, 4, 4)
    b = torch.cat([img((0.9, 0.1, 0.1), 2, 4), img((0.1, 0.2, 0.9), 2, 4)], 2).float()
    pred = torch.stack([torch.cat([a[:1], b]), torch.cat([b, a[1:]])])  # (B=2, K=2, 3, 4, 4)
    r, aux = colorize.reward_colorfulness(pred, {})
    assert r.shape == (2, 2)
    assert torch.allclose(r, torch.tensor([[0.0, math.log(2)], [math.log(2), 0.0]]), atol=1e-6)
    assert abs(aux["vivid"].item() - 0.75) < 1e-6


def test_psnr_and_gamut_edge_by_hand():
    truth = img((0.5, 0.5, 0.5)).float()
    # 0.1 off in [0, 1] = 0.2 in [-1, 1]: MSE 0.04, PSNR = 10 log10(4 / 0.04) = 20 dB
    assert abs(colorize.psnr(truth + 0.1, truth).item() - 20) < 1e-4
    x = torch.cat([img((1.0, 0.2, 0.2), 1, 4), img((0.5, 0.5, 0.5), 2, 4), img((0.2, 0.0, 0.9), 1, 4)], 2).float()
    assert abs(colorize.gamut_edge(x).item() - 0.5) < 1e-6  # two of four rows have a channel at 0 or 255


def write_folder(root):
    rng = np.random.default_rng(0)
    os.makedirs(root / "sub" / "deeper")
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 30), dtype=np.uint8), "L").save(root / "sub" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (33, 33, 4), dtype=np.uint8), "RGBA").save(root / "sub" / "deeper" / "c.PNG")
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / f"x{i}.png")
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    for name in ["a.jpg", "x0.png"]:  # cut in half: headers fine, pixel data missing (JPEG passes PIL's verify())
        (root / f"cut_{name}").write_bytes((root / name).read_bytes()[:(root / name).stat().st_size // 2])
    (root / "notes.txt").write_text("not an image")


def test_folder_loads_recursively_skips_corrupt_files(tmp_path, capsys):
    write_folder(tmp_path)
    args = argparse.Namespace(data="folder", data_dir=str(tmp_path), num_val=100)
    tr, va = colorize.load_data(args)
    assert "skipped 3 of 14 images" in capsys.readouterr().out
    names = sorted(it["id"] for it in tr + va)
    assert len(names) == 11 and os.path.join("sub", "gray.png") in names
    assert not {"broken.jpg", "cut_a.jpg", "cut_x0.png"} & set(names)
    assert len(va) == 1 and not set(it["id"] for it in va) & set(it["id"] for it in tr)  # 10% held out
    ds = colorize.Photos(tr + va, 16)
    for i in range(len(ds)):
        _, gray, rgb = ds[i]
        assert gray.shape == rgb.shape == (3, 16, 16) and -1 <= rgb.min() and rgb.max() <= 1
        if ds.items[i]["id"].endswith("gray.png"):  # a grayscale photo: its colours are its gray
            assert (rgb[0] - rgb[1]).abs().max() < 1e-6 and (gray - rgb).abs().max() < 0.02


def run(*a, timeout=900):
    return subprocess.run([sys.executable, *a], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_tiny_runs_every_stage_and_bad_dirs_fail_cleanly(tmp_path):
    out = str(tmp_path / "out")
    p = run("colorize.py", "--tiny", "--stage", "mle", "--out_dir", out)
    assert p.returncode == 2 and "no oracle" in p.stderr and "colorize.py --stage oracle" in p.stderr
    p = run("colorize.py", "--tiny", "--out_dir", out)  # one command: the oracle (stage I) first, then stage II
    assert p.returncode == 0, p.stderr[-2000:]
    assert "oracle on 16 held-out images: PSNR" in p.stdout
    res = json.load(open(tmp_path / "out" / "vqvae_colorize" / "eval.json"))
    assert list(res) == ["psnr", "colorfulness", "truth_colorfulness", "codes_used"] and 0 < res["codes_used"] <= 64
    m = json.load(open(tmp_path / "out" / "colorize" / "eval" / "metrics.json"))
    assert list(m) == ["truth", "oracle", "mle", "mle_cont", "reward"]
    assert m["reward"]["steps"] == "30+10" and m["mle_cont"]["steps"] == "30+10" and m["truth"]["psnr"] > 90
    assert len(os.listdir(tmp_path / "out" / "colorize" / "eval" / "reward")) == 8
    assert Image.open(tmp_path / "out" / "colorize" / "eval" / "grid.png").size[1] > 8 * 32
    ck = torch.load(tmp_path / "out" / "vqvae_colorize" / "ckpt.pt", weights_only=True)
    ck["model"]["sums"][0] += 1  # an oracle retrained since decodes the LMs' codes into other colours: refused
    torch.save(ck, tmp_path / "other.pt")
    for stage in ["eval", "reward"]:
        p = run("colorize.py", "--tiny", "--stage", stage, "--oracle", str(tmp_path / "other.pt"), "--out_dir", out)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "made with another oracle" in p.stderr
    for script in [["colorize.py"], ["vqvae.py", "--task", "colorize"]]:  # the new command and the old one
        p = run(*script, "--tiny", "--data", "folder", "--data_dir", str(tmp_path / "nope"), "--out_dir", out + "2")
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "nope: no such directory" in p.stderr


def test_tiny_on_a_folder_of_photos_trains_the_oracle_and_the_tiny_model(tmp_path):
    write_folder(tmp_path / "photos")
    data = ["--tiny", "--data", "folder", "--data_dir", str(tmp_path / "photos"), "--out_dir", str(tmp_path / "out")]
    p = run("colorize.py", "--stage", "oracle", "--oracle_flags", "--steps 10", *data)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "skipped 3 of 14 images" in p.stdout and "oracle on 1 held-out images" in p.stdout
    p = run("colorize.py", "--stage", "mle", "--steps", "2", *data)  # (each stage samples 256 tokens at its end)
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = torch.load(tmp_path / "out" / "colorize" / "mle" / "ckpt.pt", weights_only=True)["config"]
    assert (cfg["width"], cfg["enc_depth"], cfg["image_size"], cfg["patch"]) == (*common.SIZES["tiny"][:2], 32, 8)
