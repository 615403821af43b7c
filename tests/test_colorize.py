"""colorize.py: Lab conversion, the rewards (colorfulness, vivid_coherent), the metrics (coherence too),
the folder loader, the CLI.
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
import vqvae

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
    # the world's colours are sRGB of Lab L*=62, chroma 42 at the HUES angles: converting back finds them, unless
    # that Lab colour lies outside the sRGB gamut (a linear channel < 0 or > 1), where the stored colour was clipped
    to_linear = np.linalg.inv(np.array(colorize.RGB2XYZ))  # XYZ (D65) -> linear sRGB, unclipped
    clipped = []
    for name, h in common.HUES.items():
        a, b = 42 * math.cos(math.radians(h)), 42 * math.sin(math.radians(h))
        fy = (62 + 16) / 116  # CIE Lab -> XYZ; every f here is > 6/29 (fy +- 42/200 >= 0.46), so XYZ = f^3 x white
        lin = to_linear @ (np.array([fy + a / 500, fy, fy - b / 200]) ** 3 * np.array(colorize.WHITE))
        L, a, b = (x[0, 0, 0].item() for x in colorize.srgb_to_lab(img(common.COLORS[name])))
        if ((lin >= 0) & (lin <= 1)).all():
            assert abs(L - 62) < 0.1 and abs(math.hypot(a, b) - 42) < 0.2
            assert abs(math.degrees(math.atan2(b, a)) % 360 - h) < 0.3
            continue
        clipped.append(name)
        # out of gamut: the negative channel was stored as 0, i.e. red light was added to the nominal colour. Red
        # has luminance (Y weight 0.21 > 0), so L* rises, and red's hue (40 deg) faces teal's (195 deg, 155 apart),
        # so the chroma falls: converting back misses the check above on both counts, which is why it is exempt
        assert (common.COLORS[name][lin < 0] == 0).all() and L > 62 + 0.1 and math.hypot(a, b) < 42 - 0.2
    assert clipped == ["teal"]  # only teal is exempt: every other colour went through the full check


def test_gray_keeps_lightness_and_hides_hue():
    x = torch.cat([img(common.COLORS[n]) for n in common.HUES if n != "teal"])
    g = colorize.to_gray(x)
    L, a, b = colorize.srgb_to_lab(g)
    assert (L - 62).abs().max() < 0.1 and a.abs().max() < 1e-3 and b.abs().max() < 1e-3  # same L*, no colour
    assert (g - g[0]).abs().max() < 1e-3  # every hue gives the same gray
    gray = img((0.3, 0.3, 0.3))
    torch.testing.assert_close(colorize.to_gray(gray), gray)  # gray stays gray
    teal = img(common.COLORS["teal"])  # left out above: clipped into sRGB (red 0), its L* is not 62; it keeps its own
    L, a, b = colorize.srgb_to_lab(colorize.to_gray(teal))
    assert (L - colorize.srgb_to_lab(teal)[0]).abs().max() < 0.1 and a.abs().max() < 1e-3 and b.abs().max() < 1e-3


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


def hue(deg, chroma=30.0, L=60.0):  # an sRGB colour (3,) of Lab lightness L, chroma and hue angle (in gamut)
    return tuple(colorize.lab_to_srgb(L, chroma * math.cos(math.radians(deg)), chroma * math.sin(math.radians(deg))))


def paint(rows):  # rows of colours (3,) -> (1, 3, H, W)
    return torch.tensor(np.array(rows, np.float64)).permute(2, 0, 1)[None].float()


# the 7 hue bins over (-180, 180] degrees have edges at -180 + k 360 / 7: -25.7 | 25.7 | 77.1 ...
RED, RED2, ORANGE, BLUE, GRAY, DARK = hue(60), hue(40), hue(90), hue(-100), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)
FAINT, TINT = hue(-100, chroma=6), hue(0, chroma=6)  # tints below the vivid threshold: neutral whatever their hue


def test_coherence_one_colour_per_segment_is_one():
    x = paint([[RED, RED, BLUE, BLUE]] * 2 + [[GRAY, DARK, FAINT, TINT]] * 2)  # (1, 3, 4, 4)
    seg = torch.tensor([[[1, 1, 2, 2]] * 2 + [[3, 3, 3, 3]] * 2])  # segment 3: four neutral shades, one label
    assert colorize.coherence(x, seg).tolist() == [1.0]
    x = paint([[RED, RED2, BLUE, BLUE]] * 2 + [[GRAY, DARK, FAINT, ORANGE], [GRAY, DARK, FAINT, BLUE]])  # 60, 40
    seg = torch.tensor([[[1, 1, 2, 2]] * 2 + [[3, 3, 3, 0]] * 2])  # deg share a bin; void (0) is not a segment
    assert colorize.coherence(x, seg).tolist() == [1.0]


def test_coherence_known_splits():
    # segment 1 (8 px): 6 red + 2 orange (60 and 90 deg: other bins) -> 6/8; segment 2 (4 px): 2 blue + 2 gray
    # -> 2/4; segment 3 (4 px): 3 neutral shades + 1 blue -> 3/4. Mean over segments (not pixels): (3/4 + 1/2 + 3/4) / 3
    x = paint([[RED, RED, RED, ORANGE], [RED, RED, RED, ORANGE], [BLUE, BLUE, GRAY, DARK], [GRAY, GRAY, FAINT, BLUE]])
    seg = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    want = (6 / 8 + 2 / 4 + 3 / 4) / 3
    # a second image with its own ids: the one segment half red, half orange -> 1/2
    y = paint([[RED, ORANGE, RED, ORANGE]] * 4)
    got = colorize.coherence(torch.cat([x, y]), torch.stack([seg, torch.full((4, 4), 5)]))
    assert got.shape == (2,) and abs(got[0].item() - want) < 1e-6 and abs(got[1].item() - 0.5) < 1e-6


def test_distinct_asks_each_object_for_a_colour_of_its_own():
    def scene(obj_a, obj_b, ground=GRAY):  # 6 x 6: object 1 (2 x 2) top left, object 2 (2 x 2) bottom right
        rows = [[ground] * 6 for _ in range(6)]
        for r, c in [(1, 1), (1, 2), (2, 1), (2, 2)]:
            rows[r][c] = obj_a
        for r, c in [(4, 4), (4, 5), (5, 4), (5, 5)]:
            rows[r][c] = obj_b
        return paint(rows)
    seg = torch.full((6, 6), 3)  # 3: the ground
    seg[1:3, 1:3], seg[4:, 4:] = 1, 2
    things = torch.tensor([[1, 2, 0]])  # 0 pads
    d = lambda x, t=things, s=seg: colorize.distinct(x, s[None], t, ring=1).tolist()
    assert d(scene(RED, BLUE)) == [1.0]  # both vivid on a neutral ground
    assert d(scene(RED, DARK)) == [0.5]  # object 2 neutral like its ground: one colour over both, however coherent
    assert d(scene(RED, BLUE, ground=RED)) == [0.5]  # object 1 the ground's hue; object 2 stands out
    assert colorize.coherence(scene(GRAY, GRAY), seg[None]).tolist() == [1.0]  # what coherence cannot see...
    assert d(scene(GRAY, GRAY)) == [0.0]  # ...distinct can
    assert d(scene(RED, BLUE), torch.tensor([[1, 9]])) == [1.0]  # a thing with no visible pixel is skipped
    assert math.isnan(d(scene(RED, BLUE), torch.tensor([[9]]))[0])  # none visible: nan (summarize leaves it out)


def test_vivid_coherent_tells_objects_from_confetti():
    quads = [[RED] * 8 + [BLUE] * 8] * 8 + [[GRAY, TINT] * 4 + [ORANGE] * 8] * 8  # 4 labels, 4 colorfulness bins
    x = paint(quads)  # (1, 3, 16, 16)
    confetti = x.flatten(2)[:, :, torch.randperm(256, generator=torch.Generator().manual_seed(0))].view_as(x)
    pred, gray = torch.stack([x, confetti], 1), {"gray": torch.full((1, 3, 16, 16), 0.5)}  # (1, 2, ...): K = 2
    r0, _ = colorize.reward_colorfulness(pred, {})
    assert abs(r0[0, 0] - r0[0, 1]) < 1e-6  # the paper's score cannot tell them apart (a pixel histogram)
    r, aux = colorize.reward_vivid_coherent(pred, gray, power=1)
    # the quadrants: 480 neighbour pairs, 32 across a quadrant edge (the gray is flat everywhere)
    col = 0.75 * math.log(4)  # vivid 3/4; 4 hue bins of 1/4 each: gray and tint (hue 0), red, orange, blue
    assert abs(r[0, 0].item() - col * 448 / 480) < 1e-5
    r2, _ = colorize.reward_vivid_coherent(pred, gray)  # the default: the agreement squared
    assert abs(r2[0, 0].item() - col * (448 / 480) ** 2) < 1e-5
    assert r[0, 1] < 0.5 * r[0, 0]  # confetti: a neighbour shares the label about 1/4 of the time


def test_vivid_coherent_compares_pixels_one_code_apart():
    """A 64 x 64 colouring is 16 x 16 codes of 4 x 4 pixels: code-sized confetti agrees with itself inside every
    code, so neighbouring pixels would call it coherent; pairs one code apart (gap 64 / 16) do not."""
    rng = np.random.default_rng(0)
    blocks = [[[RED, BLUE, ORANGE, GRAY][rng.integers(4)] for _ in range(16)] for _ in range(16)]  # 4 labels
    confetti = paint(blocks).repeat_interleave(4, 2).repeat_interleave(4, 3)  # (1, 3, 64, 64), one colour per code
    halves = paint([[RED] * 8 + [BLUE] * 8] * 16).repeat_interleave(4, 2).repeat_interleave(4, 3)
    flat = {"gray": torch.full((1, 3, 64, 64), 0.5)}
    _, a = colorize.reward_vivid_coherent(confetti[:, None], flat)
    _, b = colorize.reward_vivid_coherent(halves[:, None], flat)
    assert 0.18 < a["agreement"] < 0.32  # two codes one apart share their label about 1/4 of the time
    assert abs(b["agreement"].item() - (1 - 64 * 4 / (64 * 60 * 2))) < 1e-6  # only the 4 px astride the seam differ


def test_vivid_coherent_gray_edges_excuse_colour_changes():
    x = paint([[RED, RED, BLUE, BLUE]] * 4)[:, None]  # (1, 1, 3, 4, 4): colorfulness 1 x ln 2
    flat = torch.full((1, 3, 4, 4), 0.5)
    edge = flat.clone()
    edge[..., 2:] = 0.8  # the gray image has an edge where the colour changes
    off = flat.clone()
    off[:, :, 2:] = 0.8  # an edge elsewhere (between rows 1 and 2) excuses nothing that changes
    r = [colorize.reward_vivid_coherent(x, {"gray": g}, power=1)[0].item() for g in (flat, edge, off)]
    # 24 neighbour pairs, 4 across the colour change: flat 20/24; edge: those 4 are not counted -> 20/20;
    # off: the 4 vertical pairs across its edge (all same colour) are dropped -> 16/20
    want = [math.log(2) * 20 / 24, math.log(2), math.log(2) * 16 / 20]
    assert all(abs(a - b) < 1e-5 for a, b in zip(r, want)), (r, want)
    r, aux = colorize.reward_vivid_coherent(x, {"gray": torch.tensor([[0.0, 1.0] * 2, [1.0, 0.0] * 2] * 2)
                                                .expand(1, 3, 4, 4)})
    assert abs(r.item() - math.log(2)) < 1e-5 and aux["agreement"] == 1  # no flat pair: nothing to disagree


def test_vivid_coherent_by_hand_per_image_gray_and_k():
    # 2 x 3 colourings; labels: R = red (60 deg), B = blue, N = gray (neutral; colorfulness puts its hue 0 in a
    # third bin)
    p1 = paint([[RED, RED, GRAY], [RED, BLUE, BLUE]])  # R R N / R B B
    p2 = paint([[RED, RED, BLUE], [RED, RED, BLUE]])  # R R B / R R B
    g1 = torch.tensor([[0.5, 0.5, 0.9], [0.5, 0.5, 0.9]]).expand(1, 3, 2, 3)  # an edge between columns 1 and 2
    g2 = torch.full((1, 3, 2, 3), 0.3)  # flat
    pred = torch.stack([torch.cat([p1, p2]), torch.cat([p2, p1])])  # (B=2, K=2, 3, 2, 3)
    r, aux = colorize.reward_vivid_coherent(pred, {"gray": torch.cat([g1, g2])}, power=1)
    h1 = -(1 / 2 * math.log(1 / 2) + 1 / 3 * math.log(1 / 3) + 1 / 6 * math.log(1 / 6))  # p1: R 3, B 2, N 1 of 6
    c1 = 5 / 6 * h1  # vivid 5 of 6
    c2 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))  # p2: R 4, B 2, all vivid
    # p1 under g1: flat pairs RR (row 0), RB (row 1), RR, RB, NB (columns) -> 2 of 5 agree; the edge drops RN, BB
    # p2 under g1: flat pairs RR, RR, RR, RR, BB -> 5 of 5
    # p2 under g2: all 7 pairs flat: RR, RB, RR, RB, RR, RR, BB -> 5 of 7
    # p1 under g2: RR, RN, RB, BB, RR, RB, NB -> 3 of 7
    want = torch.tensor([[c1 * 2 / 5, c2 * 1.0], [c2 * 5 / 7, c1 * 3 / 7]])
    assert r.shape == (2, 2) and torch.allclose(r, want, atol=1e-5), (r, want)
    assert abs(aux["agreement"].item() - (2 / 5 + 1 + 5 / 7 + 3 / 7) / 4) < 1e-6


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
    at = [i for i, it in enumerate(ds.items) if it["id"] == os.path.join("sub", "gray.png")]
    assert len(at) == 1
    _, gray, rgb = ds[at[0]]  # a grayscale photo: its colours are its gray
    assert (rgb[0] - rgb[1]).abs().max() < 1e-6 and (gray - rgb).abs().max() < 0.02


def test_a_folder_of_one_image_warns_that_it_is_also_the_held_out_set(tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "only.png")
    tr, va = colorize.load_data(argparse.Namespace(data="folder", data_dir=str(tmp_path), num_val=100))
    assert tr == va and len(tr) == 1 and "one readable image, used for training and held out" in capsys.readouterr().out
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "second.png")
    tr, va = colorize.load_data(argparse.Namespace(data="folder", data_dir=str(tmp_path), num_val=100))
    assert len(tr) == len(va) == 1 and tr != va and "warning" not in capsys.readouterr().out  # two: one held out


def run(*a, timeout=900):
    return subprocess.run([sys.executable, *a], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_tiny_runs_every_stage_and_bad_dirs_fail_cleanly(tmp_path):
    out = str(tmp_path / "out")
    p = run("colorize.py", "--tiny", "--stage", "mle", "--out_dir", out)
    assert p.returncode == 2 and "no oracle" in p.stderr and "colorize.py --stage oracle" in p.stderr
    # one command: the oracle (stage I) first, then stage II (a log line every step: step 1 is compared below)
    p = run("colorize.py", "--tiny", "--out_dir", out, "--log_every", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "oracle on 16 held-out images: PSNR" in p.stdout
    res = json.load(open(tmp_path / "out" / "vqvae_colorize" / "eval.json"))
    assert list(res) == ["psnr", "colorfulness", "truth_colorfulness", "codes_used"]
    # the report is the saved oracle's on the first 16 held-out scenes (vqvae.TINY): encode them again, count the
    # codes and score the reconstructions
    oracle = vqvae.load(str(tmp_path / "out" / "vqvae_colorize" / "ckpt.pt"), "colorize", "cpu")
    S, n = vqvae.TINY["image_size"], vqvae.TINY["eval_images"]
    held = colorize.Photos(colorize.load_synthetic("val", n, S, 0), S)
    gray, rgb = (torch.stack([held[i][j] for i in range(n)]) for j in (1, 2))
    codes = vqvae.encode(oracle, rgb, gray)
    assert codes.unique().numel() == res["codes_used"]
    rec = (vqvae.decode(oracle, codes, gray).clamp(-1, 1) + 1) / 2
    assert colorize.psnr(rec, (rgb + 1) / 2).mean().item() == pytest.approx(res["psnr"], rel=1e-5)
    m = json.load(open(tmp_path / "out" / "colorize" / "eval" / "metrics.json"))
    assert list(m) == ["truth", "oracle", "mle", "mle_cont", "reward"]
    assert m["reward"]["steps"] == "30+10" and m["mle_cont"]["steps"] == "30+10" and m["truth"]["psnr"] > 90
    assert m["truth"]["coherence"] > 0.9 and m["truth"]["distinct"] > 0.7
    assert all(r["coherence"] is not None and r["distinct"] is not None for r in m.values())  # (photos: None)
    # the truth row, recomputed from the data: the first 8 held-out scenes (colorize.TINY) as drawn, each with its
    # own panoptic map and thing ids (a map paired with another scene, or a row of other images, scores otherwise)
    scenes = colorize.load_synthetic("val", colorize.TINY["eval_images"], S, 0)
    truth = torch.tensor(np.stack([s["image"] for s in scenes])).permute(0, 3, 1, 2) / 255
    seg = torch.tensor(np.stack([s["panoptic"] for s in scenes]))
    things = torch.zeros(len(scenes), max(len(s["things"]) for s in scenes), dtype=torch.long)  # 0 pads
    for i, s in enumerate(scenes):
        things[i, :len(s["things"])] = torch.tensor(s["things"])
    assert colorize.coherence(truth, seg).mean().item() == pytest.approx(m["truth"]["coherence"], abs=1e-6)
    assert colorize.distinct(truth, seg, things).nanmean().item() == pytest.approx(m["truth"]["distinct"], abs=1e-6)
    assert "| coherence | objects distinct |" in p.stdout
    assert len(os.listdir(tmp_path / "out" / "colorize" / "eval" / "reward")) == 8
    assert Image.open(tmp_path / "out" / "colorize" / "eval" / "grid.png").size[1] > 8 * 32
    def mle_eval(*flags):  # --top_p reaches the eval's sampler: a nucleus of one code is greedy decoding
        assert run("colorize.py", "--tiny", "--stage", "eval", "--out_dir", out, *flags).returncode == 0
        return json.load(open(tmp_path / "out" / "colorize" / "eval" / "metrics.json"))["mle"]
    assert mle_eval("--top_p", "1e-6") == mle_eval("--eval_temperature", "0") != m["mle"]
    # --top_p reaches the reward stage's sampler too: a nucleus of one code makes each of the K samples the greedy
    # colouring, so the K rewards are equal and every advantage (a reward - the mean of the other K - 1) is 0. The
    # control is the run above at its step 1: the same start, batch and noise, top_p 0.9 (the preset)
    lines = lambda d: [json.loads(x) for x in open(tmp_path / d / "log.jsonl")]  # noqa: E731
    control = [r for r in lines("out/colorize/reward") if "adv_std" in r]
    start = ["--tiny", "--stage", "reward", "--init", str(tmp_path / "out" / "colorize" / "mle" / "ckpt.pt"),
             "--oracle", str(tmp_path / "out" / "vqvae_colorize" / "ckpt.pt"), "--log_every", "1"]
    p = run("colorize.py", *start, "--steps", "2", "--top_p", "1e-6", "--out_dir", str(tmp_path / "top_p"))
    assert p.returncode == 0, p.stderr[-2000:]
    greedy = [r for r in lines("top_p/colorize/reward") if "adv_std" in r]
    assert [r["step"] for r in greedy] == [1, 2] and all(r["adv_std"] == 0 for r in greedy)
    assert control[0]["step"] == 1 and control[0]["adv_std"] > 0  # top_p 0.9: the K samples differ
    # --reward vivid_coherent from the same start: at step 1 the same samples as the control, so their colorfulness
    # is the control's reward; the agreement (< 1: some flat pairs one code apart differ in colour) scales it down by
    # more than the log's rounding (5 decimals)
    p = run("colorize.py", *start, "--steps", "1", "--reward", "vivid_coherent", "--out_dir", str(tmp_path / "vc"))
    assert p.returncode == 0, p.stderr[-2000:]
    vc = [r for r in lines("vc/colorize/reward_vivid_coherent") if "agreement" in r]
    assert vc[0]["step"] == 1 and vc[0]["colorfulness"] == pytest.approx(control[0]["reward"], abs=2e-5)
    assert vc[0]["agreement"] < 1 and vc[0]["reward"] < vc[0]["colorfulness"] - 1e-4
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
    p = run("colorize.py", "--stage", "reward", "--steps", "1", "--reward", "vivid_coherent", *data)  # gray reaches it
    assert p.returncode == 0, p.stderr[-2000:]
    log = [json.loads(x) for x in open(tmp_path / "out" / "colorize" / "reward_vivid_coherent" / "log.jsonl")]
    # only vivid_coherent logs its two factors (reward_colorfulness: vivid, hue_entropy): that reward ran. Its
    # agreement term is tested on the synthetic world (test_tiny_runs_every_stage): this 10-step oracle paints
    # noise photos nearly gray, where every pair agrees (agreement 1, reward = colorfulness)
    assert {"agreement", "colorfulness"} <= set(log[0])
    p = run("colorize.py", "--stage", "eval", *data)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.load(open(tmp_path / "out" / "colorize" / "eval" / "metrics.json"))
    assert list(m) == ["truth", "oracle", "mle", "reward_vivid_coherent"]  # a second reward: its own dir and row
    assert all(r["coherence"] is None and r["distinct"] is None for r in m.values())
    assert p.stdout.count("n/a") == 8  # photos have no segments: coherence and distinct not invented
