"""vqvae.py: the panoptic representation, UViM decoding, the VQ bottleneck and its codebook, the CLI.
Run: python -m pytest -q tests/test_vqvae.py"""
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

import common
import vqvae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(image_size=32, patch=4, width=32, depth=1, heads=2, codebook=16, code_dim=8, out_chans=7, classes=4,
           instances=3)


def test_canonical_numbers_segments_by_centre_of_mass():
    seg = np.array([[5, 5, 9, 9], [5, 5, 9, 9], [0, 0, 7, 7], [0, 0, 7, 7]])
    sem, inst = vqvae.canonical(seg, [dict(id=7, category_id=3), dict(id=9, category_id=6), dict(id=5, category_id=1)])
    # centres (y, x): 5 -> (0.5, 0.5), 9 -> (0.5, 2.5), 7 -> (2.5, 2.5): raster order 5, 9, 7
    assert inst.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 3, 3], [0, 0, 3, 3]]
    assert sem.tolist() == [[1, 1, 6, 6], [1, 1, 6, 6], [0, 0, 3, 3], [0, 0, 3, 3]]


def test_decoding_gives_each_instance_its_summed_class():
    inst_logits = torch.zeros(1, 3, 2, 3)
    inst_logits[0, 1, :, :2] = 5  # instance 1 on the left 2 columns, instance 0 (void) on the last one
    inst_logits[0, 0, :, 2] = 5
    sem_logits = torch.zeros(1, 4, 2, 3)
    sem_logits[0, 2, 0, 0] = 10  # one pixel strongly says class 2
    sem_logits[0, 3, :, :2] = 1  # four pixels mildly say class 3: summed 4 < 10
    seg, cat = vqvae.to_panoptic(sem_logits, inst_logits)
    assert seg.tolist() == [[[1, 1, 0], [1, 1, 0]]] and cat.tolist() == [[-1, 2, -1]]


def test_quantization_is_cosine_nearest_and_straight_through():
    torch.manual_seed(0)
    m = vqvae.VQVAE(CFG)
    z = torch.randn(2, 256, 8)
    codes = m.quantize(z)
    sim = torch.nn.functional.normalize(z, dim=-1) @ m.codewords().T
    assert (sim.gather(-1, codes[..., None])[..., 0] >= sim.max(-1).values - 1e-6).all()
    target, img = torch.rand(2, 7, 32, 32), torch.rand(2, 3, 32, 32)
    m.head.weight.data.normal_()  # (the zero-init head would make every decode equal: give it weights)
    m.eval()
    logits, codes, z = m(target, img)
    assert logits.shape == (2, 7, 32, 32) and codes.shape == (2, 256)
    assert torch.equal(vqvae.encode(m, target, img), codes)  # encode = the codes the training pass used
    assert torch.equal(m.encode_z(target, img), z)  # and z: what the EMA update reads
    torch.testing.assert_close(vqvae.decode(m, codes, img), logits)  # decode(codes) = the reconstruction
    ids = torch.stack([torch.randint(0, 4, (2, 32, 32)), torch.randint(0, 3, (2, 32, 32))], 1)  # panoptic's form
    onehot = torch.cat([torch.nn.functional.one_hot(ids[:, 0], 4), torch.nn.functional.one_hot(ids[:, 1], 3)], -1)
    torch.testing.assert_close(m.encode_z(ids, img), m.encode_z(onehot.permute(0, 3, 1, 2).float(), img))
    m.train()
    logits, _, _ = m(target, img)
    logits.sum().backward()
    assert m.to_code.weight.grad.abs().sum() > 0  # the gradient passes the quantizer
    # CUDA trains the oracle under bf16 autocast: its codes stay fp32's (bf16's 3 digits tie near codewords: 1.5% of
    # these 1024 codes moved), so training picks the codes encode() gives stage II
    m = vqvae.VQVAE(dict(CFG, codebook=1024, code_dim=32))
    z = torch.randn(4, 256, 32)
    codes = m.quantize(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(m.quantize(z), codes)


def test_each_code_has_its_own_token_on_a_coarse_grid():
    # 64 px, patch 8: 8 x 8 tokens, each writes (encoder) and reads (decoder) exactly its own 2 x 2 codes
    m = vqvae.VQVAE(dict(CFG, image_size=64, patch=8))
    x = torch.zeros(1, 64, 32, requires_grad=True)
    m.codes_of(x)[0, 5 * 16 + 9].sum().backward()  # code (row 5, col 9) <- token (2, 4) only
    assert x.grad[0].abs().sum(-1).nonzero().flatten().tolist() == [2 * 8 + 4]
    q = torch.zeros(1, 256, 8, requires_grad=True)
    m.tokens_of(q)[0, 2 * 8 + 4].sum().backward()  # token (2, 4) <- codes (4..5, 8..9) only
    read = q.grad[0].abs().sum(-1).nonzero().flatten().tolist()
    assert sorted((i // 16, i % 16) for i in read) == [(4, 8), (4, 9), (5, 8), (5, 9)]
    # a finer grid (32 x 32 tokens) pools 2 x 2 tokens per code and spreads each code back over them
    f = vqvae.VQVAE(dict(CFG, image_size=64, patch=2))
    assert f.codes_of(torch.randn(2, 1024, 32)).shape == (2, 256, 8) and f.tokens_of(q).shape == (1, 1024, 32)
    with pytest.raises(vqvae.UserError, match="does not tile"):
        vqvae.VQVAE(dict(CFG, image_size=48, patch=8))  # 6 x 6 tokens


def test_pixel_head_reads_each_pixels_own_colour():
    # image seen only through the per-pixel features (patch context zeroed): one changed pixel changes its logits only
    torch.manual_seed(0)
    m = vqvae.VQVAE(dict(CFG, pixel=4)).eval()
    m.dec_ctx.weight.data.zero_()
    m.pix_head.weight.data.normal_()
    codes, img = torch.randint(0, 16, (1, 256)), torch.rand(1, 3, 32, 32)
    img2 = img.clone()
    img2[0, :, 13, 6] = 1 - img2[0, :, 13, 6]  # row 13, column 6: inside patch (3, 1), not on its corner
    changed = (vqvae.decode(m, codes, img2) - vqvae.decode(m, codes, img)).abs().sum(1)[0] > 1e-6  # (32, 32)
    assert changed.nonzero().tolist() == [[13, 6]]


def test_panoptic_ids_are_one_hot_classes_then_slots():
    """encode_z makes the (B, C + I, H, W) one-hot of (class, slot) ids itself (by scatter, 1/4 of F.one_hot's memory):
    the same input to the embedding as one_hot(class) ++ one_hot(slot), channels first."""
    torch.manual_seed(0)
    m = vqvae.VQVAE(CFG).eval()
    ids = torch.stack([torch.randint(0, 4, (2, 32, 32)), torch.randint(0, 3, (2, 32, 32))], 1)  # classes 4, slots 3
    hot = torch.cat([torch.nn.functional.one_hot(ids[:, 0], 4), torch.nn.functional.one_hot(ids[:, 1], 3)], -1)
    img = torch.randn(2, 3, 32, 32)
    assert torch.equal(m.encode_z(ids, img), m.encode_z(hot.permute(0, 3, 1, 2).float(), img))
    assert not torch.equal(m.encode_z(ids.flip(1).clamp(max=2), img), m.encode_z(ids, img))  # the ids do matter


def test_dead_codes_are_restarted_by_splitting_the_most_used():
    m = vqvae.VQVAE(CFG)
    z = torch.nn.functional.normalize(torch.randn(1, 64, 8), dim=-1)
    codes = torch.zeros(1, 64, dtype=torch.long)  # every vector lands on code 0: the others decay, die, restart
    for _ in range(600):
        m.ema_update(z, codes)
    assert (m.counts >= 0.1).all()  # no dead code is left
    w = m.codewords()
    assert (w @ w[0] > 0.99).sum() >= 8  # they were split off the one used codeword
    # splitting moves counts, it does not create them: the total is what 600 batches of 64 left after decay
    assert abs(float(m.counts.sum()) - 64 * (1 - 0.995 ** 600) / 0.005) < 20


def test_tiny_oracle_stage_then_every_stage(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, *a, "--tiny", "--out_dir", str(tmp_path)], capture_output=True,
                                    text=True, cwd=ROOT, timeout=900)  # noqa: E731
    p = run("panoptic.py", "--stage", "mle")
    assert p.returncode == 2 and "no oracle; train it first: python panoptic.py --stage oracle" in p.stderr
    assert "Traceback" not in p.stderr
    for flags, error in [("--bogus 1", "--bogus 1: not a flag of vqvae.py"),
                         ("--seed 1", "pass --seed to panoptic.py itself")]:  # a shared flag: the LM stages use it too
        p = run("panoptic.py", "--stage", "oracle", "--oracle_flags", flags)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and error in p.stderr
    p = run("panoptic.py", "--stage", "oracle")  # UViM's stage I: vqvae.py's training on panoptic.py's scenes
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.load(open(tmp_path / "vqvae_panoptic" / "eval.json"))
    assert list(res) == ["All", "Things", "Stuff", "codes_used"]
    assert "oracle on 16 held-out scenes" in p.stdout
    # the report recomputed: the saved oracle encodes the first 16 held-out scenes (vqvae.TINY) again, decodes them
    import panoptic
    oracle = vqvae.load(str(tmp_path / "vqvae_panoptic" / "ckpt.pt"), "panoptic", "cpu")
    S, n, groups = vqvae.TINY["image_size"], vqvae.TINY["eval_images"], ("All", "Things", "Stuff")
    va = panoptic.Scenes(common.synthetic_world("val", n, S, 0), common.CATEGORIES, oracle.c["instances"], S)
    used = {c for i in range(n) for c in vqvae.encode(oracle, va[i][2][None], va[i][1][None]).flatten().tolist()}
    assert len(used) == res["codes_used"]
    pq = lambda preds: panoptic.pq_in_memory(preds, va)  # noqa: E731
    assert all(pq(panoptic.predict(None, oracle, va, "cpu", n, 0))[g] == pytest.approx(res[g]) for g in groups)
    # the decoding and the scoring lose nothing: the ground truth itself as one-hot logits, through the same
    # to_panoptic, scores 100
    onehot = lambda x, k: torch.nn.functional.one_hot(x, k).permute(2, 0, 1)[None].float()  # noqa: E731
    truth = [x for i in range(n) for x in panoptic.as_segments(*vqvae.to_panoptic(
        onehot(va[i][2][0], oracle.c["classes"]), onehot(va[i][2][1], oracle.c["instances"])), va.categories)]
    assert all(pq(truth)[g]["pq"] == pytest.approx(100) for g in groups)
    # a trivial baseline, blind to the image: above the middle row the stuff most often on top in the 64 training
    # scenes (vqvae.TINY), below it the most frequent bottom one. The trained oracle (codes and image) must find
    # each scene's own stuff and its horizon (its things: not yet, at 30 steps)
    train = common.synthetic_world("train", vqvae.TINY["num_train"], S, 0)
    top, bottom = (Counter(s["stuff"][j] for s in train).most_common(1)[0][0] for j in (0, 1))
    ids = {c["name"]: c["id"] for c in common.CATEGORIES}
    blind = np.where(np.arange(S)[:, None] < S // 2, 1, 2).repeat(S, 1).astype(np.uint32)
    base = pq([(blind, {1: ids[top], 2: ids[bottom]})] * n)
    assert res["Stuff"]["pq"] > base["Stuff"]["pq"] and res["All"]["pq"] > base["All"]["pq"]
    for args, key in [(["panoptic.py", "--stage", "oracle", "--oracle_flags", "--wd 0.5"], "wd"),
                      (["panoptic.py", "--stage", "oracle", "--oracle_flags=--width 48"], "width"),
                      (["panoptic.py", "--stage", "oracle", "--seed", "1"], "seed"),
                      (["vqvae.py", "--task", "panoptic", "--optimizer", "adafactor"], "optimizer")]:  # the old command
        p = run(*args, "--resume")
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and f"other flags: ['{key}']" in p.stderr
    p = run("panoptic.py", "--oracle_flags", "--width 48")  # --stage all would reuse an oracle of other flags
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "an oracle of other flags ['width']" in p.stderr
    p = run("panoptic.py", "--log_every", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"oracle: {tmp_path / 'vqvae_panoptic' / 'ckpt.pt'} exists, reused" in p.stdout  # --stage all
    assert f"encoder: {tmp_path / 'panoptic' / 'encoder' / 'encoder.pt'}" in p.stdout  # mle began from that ViT
    ev = tmp_path / "panoptic" / "eval"
    m = json.load(open(ev / "metrics.json"))
    assert list(m) == ["oracle", "mle", "mle_cont", "reward"] and m["reward"]["steps"] == "30+10"
    for name, row in m.items():  # each row is pq_compute of the files written: gt.json + gt/, pred_<name>.json + /
        again = panoptic.pq_compute(str(ev / "gt.json"), str(ev / f"pred_{name}.json"))
        assert all(100 * again[g]["pq"] == pytest.approx(row[g]["pq"]) for g in groups), name
    # the predictions are a COCO panoptic set: every PNG holds exactly the segments its json entry lists
    from PIL import Image
    for name in ["oracle", "reward"]:
        for a in json.load(open(ev / f"pred_{name}.json"))["annotations"]:
            ids = panoptic.rgb2id(np.asarray(Image.open(ev / f"pred_{name}" / a["file_name"]).convert("RGB")))
            assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in a["segments_info"]}
    assert len(os.listdir(ev / "pred_reward")) == 8
    w, h = Image.open(ev / "grid.png").size  # 8 scenes, rows of 5 equal square panels (image, truth, 3 models)
    assert w % 5 == 0 and 8 * (w // 5) <= h < 9 * (w // 5)  # (and a legend row below)
    # the reward is the matched segments' IoUs - 0.3 x FP, each match an IoU in (0.5, 1]: its mean over the
    # samples lies in [0.5 TP - 0.3 FP, TP - 0.3 FP] of the mean counts logged with it (5 decimals)
    log = [x for x in map(json.loads, open(tmp_path / "panoptic" / "reward" / "log.jsonl")) if "reward" in x]
    assert len(log) == 10 and all(0.5 * x["tp"] - 0.3 * x["fp"] - 1e-4 <= x["reward"] <= x["tp"] - 0.3 * x["fp"] + 1e-4
                                  for x in log)
    assert any(0.5 * x["tp"] - 0.3 * x["fp"] > 0.01 for x in log)  # a band without 0: a reward of 0 would not pass
    # an oracle retrained since (here: one codeword moved) decodes the LMs' codes into other things: refused
    ck = torch.load(tmp_path / "vqvae_panoptic" / "ckpt.pt", weights_only=True)
    ck["model"]["sums"][0] += 1
    torch.save(ck, tmp_path / "other.pt")
    for stage in ["eval", "reward"]:
        p = run("panoptic.py", "--stage", stage, "--oracle", str(tmp_path / "other.pt"))
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "made with another oracle" in p.stderr


def test_micro_batches_train_the_oracle_as_the_whole_batch_does(tmp_path, monkeypatch):
    """--micro_batch (COCO's one-hot does not fit a whole batch): forwards of 2 images give the same codes, codebook
    and weights as one batch of 8 (vqvae.TINY); the codebook moves once a step, not once a micro-batch."""
    p = subprocess.run([sys.executable, "panoptic.py", "--stage", "oracle", "--tiny", "--out_dir", str(tmp_path / "0"),
                        "--oracle_flags", "--steps 5"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    import panoptic  # the same command with --micro_batch 2, in this process: it counts the forwards' images
    seen, forward = [], vqvae.VQVAE.forward
    monkeypatch.setattr(vqvae.VQVAE, "forward", lambda m, t, *a: seen.append(len(t)) or forward(m, t, *a))
    monkeypatch.setattr(sys, "argv", ["panoptic.py", "--stage", "oracle", "--tiny", "--out_dir", str(tmp_path / "2"),
                                      "--oracle_flags", "--micro_batch 2 --steps 5"])
    panoptic.main()
    assert seen == [2] * 4 * 5
    whole, parts = (torch.load(tmp_path / m / "vqvae_panoptic" / "ckpt.pt", weights_only=True)["model"] for m in "02")
    assert torch.equal(whole["counts"], parts["counts"])  # the same codes were counted, with one decay a step
    for k, v in whole.items():
        # float summation order; Adam's 1 / sqrt(v) magnifies it where a gradient is ~0 (pix_head: 1.1e-5 of its
        # scale on one CPU model, < 1e-5 on another)
        assert torch.allclose(v, parts[k], rtol=0, atol=1e-4 * float(v.abs().max())), k
    p = subprocess.run([sys.executable, "panoptic.py", "--stage", "oracle", "--tiny", "--out_dir", str(tmp_path / "3"),
                        "--oracle_flags", "--micro_batch 3"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "divide the per-process batch 8" in p.stderr
