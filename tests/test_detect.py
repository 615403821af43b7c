"""detect.py: token format, the rewards on hand-computed cases, COCO loading and evaluation.
Run: python -m pytest -q tests/test_detect.py"""
import argparse
import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import common
import detect

W2 = [0.5, 1.5]  # class weights of a 2-class world (mean 1)


def seq(boxes, labels, slots=8):
    return detect.encode(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels), slots)


def batch(gt_boxes, gt_labels, weights=(1.0, 1.0), slots=8):
    gb, gl = detect.gt_arrays([torch.tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)], [torch.tensor(gt_labels)],
                              slots)
    return dict(gt_boxes=gb, gt_labels=gl, class_weights=list(weights))


def rewards(preds, b):
    pred = torch.stack([seq(*p) for p in preds])[None]  # (1, K, L)
    return detect.reward_map(pred, b)[0][0, 0].item(), detect.reward_recall(pred, b)[0][0, 0].item()


A, B = [0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]


def test_token_round_trip_within_one_quantization_step():
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(6, 4, generator=g)
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    labels = torch.randint(0, 80, (6,), generator=g)
    t = detect.encode(boxes, labels, 10)
    assert t.shape == (60,) and (t[36:] == 0).all()  # 4 padding boxes, all token 0
    b, l, v = detect.decode(t, 80)
    assert v.tolist() == [True] * 6 + [False] * 4 and torch.equal(l[:6], labels)
    assert (b[:6] - boxes).abs().max() <= 0.5 / 1000 + 1e-6
    assert detect.grammar(10, 80)[torch.arange(60), t][:37].all()  # GT tokens obey the grammar (up to the end)


def test_perfect_duplicate_wrong_class():
    b = batch([A], [0])
    assert rewards([([A], [0])], b) == (pytest.approx(1.0), pytest.approx(1.0))
    # the copy would have matched, but its GT is taken: -0.3 at every threshold
    assert rewards([([A, A], [0, 0])], b) == (pytest.approx(0.7), pytest.approx(0.7))
    assert rewards([([A], [1])], b) == (0.0, 0.0)


def test_iou_exactly_at_threshold_is_not_a_match():
    b = batch([A], [0])
    half = [0.0, 0.0, 0.4, 0.2]  # IoU = 0.08 / 0.16 = 0.5 exactly; the authors' match is strict (IoU > thr)
    assert rewards([([half], [0])], b) == (0.0, 0.0)
    iou57 = [0.0, 0.0, 0.4, 0.228]  # IoU 0.57: passes 0.50 and 0.55 only -> 2 of 10 thresholds
    assert rewards([([iou57], [0])], b) == (pytest.approx(0.2), pytest.approx(1.0))
    iou55 = [0.0, 0.0, 0.4, 0.22]  # IoU 0.55 exactly: passes 0.50 only
    assert rewards([([iou55], [0])], b) == (pytest.approx(0.1), pytest.approx(1.0))
    for k in range(10):  # IoU exactly 0.50, 0.55, ..., 0.95 (width 200 + 20 k of 400 levels): passes k thresholds
        tie = [0.0, 0.0, 0.4, (200 + 20 * k) / 1000]
        assert rewards([([tie], [0])], b)[0] == pytest.approx(k / 10), k


def test_padding_and_no_ground_truth():
    b = batch([A], [0])
    assert rewards([([], [])], b) == (0.0, 0.0)  # all padding: nothing predicted
    empty = batch([], [])
    assert rewards([([A, B], [0, 1])], empty) == (0.0, 0.0)  # false positives cost nothing (authors' reward)


def test_many_predictions_with_class_weights():
    b = batch([A, B], [0, 1], W2)
    a825 = [0.0, 0.0, 0.4, 0.33]  # IoU 0.825 with A: a duplicate at the 7 thresholds 0.50..0.80
    far, b_wrong = [0.9, 0.0, 1.0, 0.1], B
    preds = [([A, a825, B, far, b_wrong], [0, 0, 1, 0, 0])]
    r_map, r_rec = rewards(preds, b)
    assert r_map == pytest.approx(0.5 + 1.5 - 0.3 * 0.5 * 7 / 10)  # weighted matches - weighted duplicates
    assert r_rec == pytest.approx(2 - 0.3)  # recall reward is unweighted


def test_reward_vectorized_over_samples_and_iou_for_confidence():
    b = batch([A], [0])
    pred = torch.stack([seq([A], [0]), seq([[0.0, 0.0, 0.4, 0.228]], [0]), seq([], [])])[None]
    r, _ = detect.reward_map(pred, b)
    assert r.shape == (1, 3) and r[0].tolist() == pytest.approx([1.0, 0.2, 0.0])
    iou = detect.match(pred, b, 0.5, b["class_weights"])[2]  # the reward stage's confidence target, any reward
    assert iou[0, :, 0].tolist() == pytest.approx([1.0, 0.57, 0.0], abs=1e-3)


def test_class_weights_smoothed_inverse_frequency():
    items = [dict(labels=[0]), dict(labels=[1, 1, 1])]
    w = detect.class_weights(items, 2)
    raw = [1 / (1 + 0.05 * 4), 1 / (3 + 0.05 * 4)]
    assert w == pytest.approx([2 * raw[0] / sum(raw), 2 * raw[1] / sum(raw)])


def test_conf_loss_is_minimal_at_the_matched_iou():
    logits = torch.zeros(1, 6, 1010, requires_grad=True)
    tok = seq([A], [0], slots=1)[None]
    iou = torch.tensor([[0.7]])
    masked = logits.masked_fill(~detect.grammar(1, 5), float("-inf"))  # as the model's forward does
    detect.conf_loss(masked, tok, iou, 5).backward()
    g = logits.grad[0, 5]  # at P1 = P2 = 0.5 the loss pushes P2 up towards 0.7
    assert g[2] < 0 < g[1]
    ps = torch.linspace(0.05, 0.95, 19)  # P2 on a grid that holds 0.7: the loss is lowest there
    losses = []
    for q in ps:
        lg = torch.zeros(1, 6, 1010)
        lg[0, 5, 1], lg[0, 5, 2] = torch.log(1 - q), torch.log(q)
        losses.append(detect.conf_loss(lg.masked_fill(~detect.grammar(1, 5), float("-inf")), tok, iou, 5))
    assert ps[torch.stack(losses).argmin()] == pytest.approx(0.7)


def test_match_each_prediction_keeps_its_best_gt_each_gt_its_best_prediction():
    """The authors' greedy rule, not a maximum matching: a prediction that overlaps two GTs of its class keeps
    only the better one (listed second here), so the other GT stays unmatched even though it was above the
    threshold. Batch of 2: image 1 is a plain perfect match (class weights W2 = 0.5, 1.5)."""
    g1, g2 = [0.0, 0.0, 0.4, 0.3], [0.0, 0.0, 0.4, 0.4]  # areas 400 x 300 = 120000, 400 x 400 = 160000 levels^2
    p1 = g2  # IoU(p1, g1) = 120000 / 160000 = 0.75, IoU(p1, g2) = 1
    p2 = [0.0, 0.16, 0.4, 0.4]  # area 400 x 240 = 96000: IoU(p2, g2) = 96000 / 160000 = 0.6;
    # IoU(p2, g1): intersection 400 x 140 = 56000, union 96000 + 120000 - 56000 = 160000 -> 0.35 (no match)
    gb, gl = detect.gt_arrays([torch.tensor([g1, g2]), torch.tensor([B])], [torch.tensor([0, 0]), torch.tensor([1])],
                              8)
    pred = torch.stack([seq([p1, p2], [0, 0]), seq([B], [1])])[:, None]  # (2 images, K = 1, L)
    m, d, iou = detect.match(pred, dict(gt_boxes=gb, gt_labels=gl), 0.5, W2)
    # image 0: p1 keeps g2 (1 > 0.75), drops g1; p2 keeps g2 (0.6). g2 is won by p1 (1 > 0.6): matched {g2} = 0.5
    # (class 0), p2 a duplicate = 0.5; g1 nobody's best: unmatched. Image 1: one match of class 1 = 1.5, no duplicate
    assert m[:, 0].tolist() == pytest.approx([0.5, 1.5]) and d[:, 0].tolist() == pytest.approx([0.5, 0.0])
    assert iou[0, 0, :3].tolist() == pytest.approx([1.0, 0.6, 0.0]) and iou[1, 0, :2].tolist() == pytest.approx(
        [1.0, 0.0])  # match_iou: each prediction's IoU with the one GT it kept (the confidence target)
    m, d, iou = detect.match(pred, dict(gt_boxes=gb, gt_labels=gl), 0.7, W2)  # p2 (0.6) out; p1 still keeps g2 only
    assert m[:, 0].tolist() == pytest.approx([0.5, 1.5]) and d[:, 0].tolist() == pytest.approx([0.0, 0.0])
    assert iou[0, 0, :2].tolist() == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize("p2,want", [(0.7, 0.0), (0.5, -0.2), (0.9, 0.2)])
def test_conf_loss_gradient_vanishes_where_p2_equals_the_iou(p2, want):
    """Slot 5 with only tokens 1, 2 possible: ce = -(1 - u) log P1 - u log P2 has d ce / d z2 = P2 - u and
    d ce / d z1 = u - P2 (z: the two logits), divided by the 2 box slots (fixed denominator; the second is
    padding and gets no gradient). Target u = 0.7: zero at P2 = 0.7, P2 pushed up below it, down above it."""
    z = torch.tensor([0.0, float(np.log(p2 / (1 - p2)))], requires_grad=True)  # softmax(z)[1] = p2
    ninf = torch.tensor([float("-inf")])
    slot = torch.cat([ninf, z])  # vocab 3: token 0 impossible at the confidence slot
    logits = torch.cat([torch.zeros(1, 5, 3), slot[None, None], torch.zeros(1, 6, 3)], 1)  # (1, 12, 3)
    tok = seq([A], [0], slots=2)[None]  # one box, one padding slot
    detect.conf_loss(logits, tok, torch.tensor([[0.7, 0.0]]), 5).backward()
    assert z.grad.tolist() == pytest.approx([-want / 2, want / 2], abs=1e-6)


def write_coco(root, split, n_img=4):
    """A tiny COCO instances layout: category ids with gaps, a crowd box, grayscale / RGBA /
    odd-sized images, one image without objects, one unreadable image."""
    os.makedirs(root / split, exist_ok=True)
    os.makedirs(root / "annotations", exist_ok=True)
    rng = np.random.default_rng(0)
    specs = [(48, 64, "RGB", "a.jpg"), (33, 47, "L", "b.png"), (40, 40, "RGBA", "c.png"), (50, 30, "RGB", "d.png")]
    images, anns = [], []
    for i, (w, h, mode, name) in enumerate(specs[:n_img]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode).save(root / split / name)
        images.append(dict(id=10 + i, file_name=name, width=w, height=h))
    (root / split / "broken.jpg").write_bytes(b"\x00not an image")
    images.append(dict(id=99, file_name="broken.jpg", width=10, height=10))
    for i, (iid, cat, box, crowd) in enumerate([(10, 3, [5, 6, 20, 30], 0), (10, 7, [30, 10, 10, 12], 0),
                                                (11, 1, [2, 2, 20, 20], 0), (11, 3, [0, 0, 33, 47], 1),
                                                (12, 7, [10, 5, 25, 30], 0)]):
        anns.append(dict(id=i + 1, image_id=iid, category_id=cat, bbox=box, area=box[2] * box[3], iscrowd=crowd))
    cats = [dict(id=c, name=n) for c, n in [(1, "person"), (3, "car"), (7, "train")]]
    with open(root / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(dict(images=images, annotations=anns, categories=cats), f)


def test_coco_loader_takes_exports_as_they_come(tmp_path):
    """Annotation ids repeated (merged exports; COCOeval keys on them), no iscrowd / area fields, a photo whose
    stored size is not the json's (EXIF-rotated): still AP 100 for the ground truth, the photo skipped."""
    write_coco(tmp_path, "val")
    path = tmp_path / "annotations" / "instances_val.json"
    d = json.load(open(path))
    d["annotations"] = [{k: v for k, v in dict(a, id=1).items() if k not in ("area", "iscrowd") or a["iscrowd"]}
                        for a in d["annotations"]]
    d["images"][3].update(width=30, height=50)  # d.png is stored 50 x 30
    json.dump(d, open(path, "w"))
    items, gt, _, cats = detect.load_coco(str(tmp_path), "val")
    items = common.readable(items, "val")
    assert [it["id"] for it in items] == [10, 11, 12]
    res = [dict(image_id=it["id"], category_id=cats[l], bbox=detect.to_xywh(b, it), score=1.0)
           for it in items for b, l in zip(it["boxes"].tolist(), it["labels"])]
    m = detect.coco_eval(gt, res, [it["id"] for it in items])
    assert m["AP"] == pytest.approx(100.0) and m["AR100"] == pytest.approx(100.0)
    d["images"][1]["id"] = 10  # two images with one id: their boxes would mix
    json.dump(d, open(path, "w"))
    with pytest.raises(common.UserError, match="repeat another image's id"):
        detect.load_coco(str(tmp_path), "val")


def test_coco_splits_must_list_the_same_categories(tmp_path):
    write_coco(tmp_path, "train")
    write_coco(tmp_path, "val")
    path = tmp_path / "annotations" / "instances_val.json"
    d = json.load(open(path))
    d["categories"].append(dict(id=9, name="boat"))  # val has a class train has not (an IndexError at eval before)
    json.dump(d, open(path, "w"))
    args = argparse.Namespace(data="coco", data_dir=str(tmp_path), train_split="train", val_split="val")
    with pytest.raises(common.UserError, match="differ from --train_split"):
        detect.load_data(args)


def test_coco_loader_and_eval_in_original_coordinates(tmp_path):
    write_coco(tmp_path, "val")
    items, gt, names, cats = detect.load_coco(str(tmp_path), "val")
    assert names == ["person", "car", "train"] and cats == [1, 3, 7]
    items = common.readable(items, "val")
    assert [it["id"] for it in items] == [10, 11, 12, 13]  # the broken image is skipped
    it = items[1]
    assert it["labels"] == [0]  # the crowd box is not a training target
    ds = detect.Boxes(items, 32)
    _, img, boxes, labels = ds[1]  # a grayscale 33x47 image becomes RGB 32x32
    assert img.shape == (3, 32, 32) and img.min() >= -1 and img.max() <= 1
    # ground truth pushed through the normalized format and back scores AP 100 (crowd ignored)
    res = [dict(image_id=it["id"], category_id=cats[l], bbox=detect.to_xywh(b, it), score=1.0)
           for it in items for b, l in zip(it["boxes"].tolist(), it["labels"])]
    m = detect.coco_eval(gt, res, [it["id"] for it in items])
    assert m["AP"] == pytest.approx(100.0) and m["AR100"] == pytest.approx(100.0)
    shifted = [dict(r, bbox=[r["bbox"][0] + 0.3 * r["bbox"][2]] + r["bbox"][1:]) for r in res]  # IoU ~0.54
    assert detect.coco_eval(gt, shifted, [it["id"] for it in items])["AP"] < 60
    assert detect.coco_eval(gt, [], [10])["AP"] == 0.0


def test_malformed_annotation_file_is_a_clear_error(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text('{"images": [}')
    with pytest.raises(detect.UserError, match="instances_val.json: malformed"):
        detect.load_coco(str(tmp_path), "val")
    with pytest.raises(detect.UserError, match="no such directory"):
        detect.load_coco(str(tmp_path / "nope"), "val")


def test_synthetic_ground_truth_scores_100_through_cocoeval():
    """The synthetic GT json is a valid COCO file: unique annotation ids (COCOeval matches by id)
    and the training targets pushed through to_xywh score AP = AR = 100."""
    items, gt, _ = detect.load_synthetic("val", 20, 64, 0)  # --missed 0: the annotations are the truth
    ids = [a["id"] for a in gt["annotations"]]
    assert len(ids) == len(set(ids)) == sum(len(it["labels"]) for it in items) > 20
    res = [dict(image_id=it["id"], category_id=l + 1, bbox=detect.to_xywh(b, it), score=1.0)
           for it in items for b, l in zip(it["boxes"].tolist(), it["labels"])]
    m = detect.coco_eval(gt, res, range(20))
    assert m["AP"] == pytest.approx(100.0) and m["AR100"] == pytest.approx(100.0)


def test_png_with_a_broken_pixel_stream_is_one_line(tmp_path):
    """Valid chunks (CRCs) around an IDAT that is not zlib: readable() keeps it (it does not decode PNG pixels,
    too slow for 100k files); loading it is a UserError naming the file, not an OSError traceback mid-run."""
    import struct
    import zlib
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(  # noqa: E731
        ">I", zlib.crc32(kind + data))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", b"not a zlib stream at all") + chunk(b"IEND", b"")
    (tmp_path / "bad.png").write_bytes(png)
    item = dict(id=1, file=str(tmp_path / "bad.png"), w=8, h=8, size=(8, 8), boxes=np.zeros((0, 4), np.float32),
                labels=[])
    assert common.readable([item], "t") == [item]
    import caption
    import colorize
    for dataset in [detect.Boxes, caption.Images, colorize.Photos]:  # every real-data loader of an image
        with pytest.raises(common.UserError, match="bad.png: unreadable image"):
            dataset([item], 16)[0]


def test_annotator_misses_at_its_rate_per_scene_and_seed_and_keeps_the_truth():
    """--missed P: each object unannotated with probability P, fixed per (seed, split, scene); the truth keeps all."""
    n = 400
    items, gt, truth = detect.load_synthetic("train", n, 64, 0, missed=0.3)
    clean, _, _ = detect.load_synthetic("train", n, 64, 0)
    n_true = sum(len(it["true_labels"]) for it in items)
    kept = sum(len(it["labels"]) for it in items) / n_true
    assert abs(kept - 0.7) < 3 * (0.21 / n_true) ** 0.5  # binomial: within 3 standard deviations
    assert len(gt["annotations"]) == sum(len(it["labels"]) for it in items) and len(truth["annotations"]) == n_true
    for it, c in zip(items, clean):  # the truth is the clean world's annotation; the annotations a subset of it
        np.testing.assert_array_equal(it["true_boxes"], c["boxes"])
        assert it["true_labels"] == c["labels"]
        true = {tuple(b) + (lab,) for b, lab in zip(it["true_boxes"].tolist(), it["true_labels"])}
        assert {tuple(b) + (lab,) for b, lab in zip(it["boxes"].tolist(), it["labels"])} <= true
    again = detect.load_synthetic("train", n, 64, 0, missed=0.3)[0]
    other = detect.load_synthetic("train", n, 64, 1, missed=0.3)[0]
    assert all(a["labels"] == b["labels"] and np.array_equal(a["boxes"], b["boxes"]) for a, b in zip(items, again))
    assert any(len(a["labels"]) != len(a["true_labels"]) for a in other)
    val = detect.load_synthetic("val", n, 64, 0, missed=0.3)[0]  # the held-out split is annotated alike
    assert abs(sum(len(it["labels"]) for it in val) / sum(len(it["true_labels"]) for it in val) - 0.7) < 0.05
    miss = [[len(a["labels"]) < len(a["true_labels"]) for a in x] for x in (items, other)]
    assert miss[0] != miss[1]  # another seed misses other objects


def test_box_noise_moves_edges_by_its_share_of_the_box():
    items, _, _ = detect.load_synthetic("train", 200, 64, 0, box_noise=0.1)
    d, size = [], []
    for it in items:
        assert it["labels"] == it["true_labels"]  # noise alone drops nothing
        d.append(it["boxes"] - it["true_boxes"])
        size.append(np.repeat(it["true_boxes"][:, 2:] - it["true_boxes"][:, :2], 2, 1)[:, [0, 2, 1, 3]])
    rel = np.concatenate(d) / np.concatenate(size)  # edge shift / box height or width
    inside = rel[np.abs(rel) < 0.5]  # 5 standard deviations: leaves out edges clipped at the image border
    assert 0.08 < inside.std() < 0.12 and abs(inside.mean()) < 0.01  # N(0, 0.1 x the size)


def test_box_score_ranks_by_class_place_and_iou():
    """A box scores p(class) x the geometric mean of its coordinates' probabilities x the expected IoU: an unsure
    coordinate or class lowers it, and the four coordinates count alike (a geometric mean, not a product)."""
    p = torch.tensor([[[.9, .9, .9, .9, .8, 1], [.9, .9, .9, .1, .8, 1],  # (1 image, 4 boxes, 6 tokens)
                       [.9, .9, .9, .9, .4, 1], [.1, .9, .9, .9, .8, 1]]])
    s = detect.box_score(p, torch.full((1, 4), 0.5))[0]
    assert s[0] == pytest.approx(0.8 * 0.9 * 0.5) and s[1] < s[0] and s[2] == pytest.approx(s[0] / 2)
    assert s[3] == pytest.approx(s[1])  # which coordinate is unsure does not matter
    assert s[1] == pytest.approx(0.8 * (0.9 ** 3 * 0.1) ** 0.25 * 0.5)
    assert torch.allclose(detect.box_score(p, torch.full((1, 4), 1.0))[0], 2 * s)  # the expected IoU scales it


def test_eval_scores_against_the_annotations_and_the_truth():
    """A prediction of exactly the truth: perfect against the truth; against annotations missing 30% it finds the
    annotated objects (AR 100) but its extra boxes are false positives (AP < 100); no duplicates either way."""
    items, gt, truth = detect.load_synthetic("val", 30, 64, 0, missed=0.3)
    res = [dict(image_id=it["id"], category_id=l + 1, bbox=detect.to_xywh(b, it), score=1.0)
           for it in items for b, l in zip(it["true_boxes"].tolist(), it["true_labels"])]
    m_truth, m_ann = detect.coco_eval(truth, res, range(30)), detect.coco_eval(gt, res, range(30))
    assert m_truth["AP"] == pytest.approx(100.0) and m_ann["AR100"] == pytest.approx(100.0) and m_ann["AP"] < 90
    tok = torch.stack([seq(it["true_boxes"], it["true_labels"]) for it in items])
    score = torch.rand(tok.shape[0], 8)
    for key in ["", "true_"]:
        c = detect.box_checks(tok, score, items, key, 5)
        assert c["dups_per_image"] == 0
    twice = torch.stack([seq(np.concatenate([it["true_boxes"]] * 2)[:8], (it["true_labels"] * 2)[:8]) for it in items])
    n_dup = np.mean([min(8, 2 * len(it["true_labels"])) - len(it["true_labels"]) for it in items])
    assert detect.box_checks(twice, score, items, "true_", 5)["dups_per_image"] == pytest.approx(n_dup)
    # a score equal to the IoU against the truth ranks perfectly: Spearman 1
    iou = torch.tensor([[1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.01]]).expand(len(items), 8)
    shrunk = []
    for it in items:  # box j of each image shrunk so its IoU with its true box falls with j
        b = it["true_boxes"].copy()
        k = np.sqrt(iou[0, :len(b)].numpy())[:, None]
        b[:, 2:] = b[:, :2] + (b[:, 2:] - b[:, :2]) * k
        shrunk.append(seq(b, it["true_labels"]))
    assert detect.box_checks(torch.stack(shrunk), iou, items, "true_", 5)["score_iou_rho"] > 0.95
    assert detect.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert detect.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert detect.spearman([1, 1, 2], [5, 5, 5]) is None


def test_a_fifo_named_like_an_image_is_skipped_not_waited_on(tmp_path):
    """Image.open on a named pipe blocks until someone writes to it: readable() hung on one (a stray mkfifo in a data
    folder); now it is not a file, so it is skipped and counted like any unreadable image."""
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")
    items = [dict(id=i, file=str(tmp_path / n)) for i, n in enumerate(["ok.png", "pipe.png"])]

    class Hung(BaseException):  # not an Exception: readable() turns those into "unreadable", and would pass
        pass

    def hung(*_):
        raise Hung("readable() blocked on the FIFO")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)  # the old code blocked here forever: fail, do not hang the suite
    try:
        assert common.readable(items, "t") == items[:1]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_micro_batch_bounds_the_eval_batch_and_changes_no_prediction(monkeypatch):
    """--micro_batch is also eval's batch (a COCO eval at 1280 px does not fit 128 images): 5 images in batches of
    2, 2, 1 give the greedy boxes, scores and rewards of one batch of 5."""
    items, _, _ = detect.load_synthetic("val", 5, 32, 0)
    names = [c["name"] for c in common.CATEGORIES]
    meta = dict(classes=names, cat_ids=[c["id"] for c in common.CATEGORIES], max_boxes=4, reward="map",
                class_weights=[1.0] * len(names))
    nc = len(names)
    torch.manual_seed(0)
    model = common.build_model(common.model_config("tiny", 32, detect.CLS0 + nc + 1, 24, detect.CLS0 + nc, 1, 8),
                               "cpu")
    sizes, sample, encoder = [], common.sample, model.encoder.forward
    monkeypatch.setattr(common, "sample", lambda m, imgs, *a, **k: sizes.append(len(imgs)) or sample(m, imgs, *a, **k))
    monkeypatch.setattr(model.encoder, "forward", lambda x: sizes.append(-len(x)) or encoder(x))  # encoder: < 0
    whole = detect.predict(model, detect.Boxes(items, 32), meta, "cpu", 5)
    parts = detect.predict(model, detect.Boxes(items, 32), meta, "cpu", 5, micro_batch=2)
    assert sizes == [-5, 5, -2, 2, -2, 2, -1, 1]  # and the encoder once a batch: sampling and P(conf) share it
    res, r, nb, tok, score = whole
    assert len(res) > 0 and torch.equal(tok, parts[3])  # the same greedy tokens: the same boxes
    assert [x["bbox"] for x in res] == [x["bbox"] for x in parts[0]]
    assert torch.allclose(score, parts[4], atol=1e-5) and (r, nb) == pytest.approx(parts[1:3], abs=1e-6)
    # the shared encoder pass changes no score: P(conf 2) from a pass that runs its own encoder gives the same
    imgs = torch.stack([detect.Boxes(items, 32)[i][1] for i in range(5)])
    with torch.no_grad():
        logp = sample(model, imgs, 24, temperature=0, allowed=detect.grammar(4, nc, (2,)), end_token=0)[1]
        p2 = model(imgs, tok, detect.grammar(4, nc))[:, 5::6].softmax(-1)[..., 2]
    assert torch.equal(detect.box_score(logp[:, 0].view(5, -1, 6).exp(), p2), score)


def test_each_file_is_checked_once_a_process(tmp_path, monkeypatch, capsys):
    """--stage all loads the data at every stage (COCO: 118k files, ~1.6 ms each, every rank): the second load reads
    no file again, and keeps and skips the same images, with the same warning."""
    Image.new("RGB", (8, 6)).save(tmp_path / "ok.png")
    Image.new("RGB", (8, 6)).save(tmp_path / "turned.png")  # annotated 6 x 8: skipped
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    load = lambda: [dict(id=i, file=str(tmp_path / n), size=s) for i, (n, s) in enumerate(  # noqa: E731
        [("ok.png", [8, 6]), ("turned.png", [6, 8]), ("bad.jpg", None)])]
    opened, real = [], Image.open
    monkeypatch.setattr(Image, "open", lambda f, *a: opened.append(f) or real(f, *a))
    first, second = common.readable(load(), "t"), common.readable(load(), "t")
    assert first == second == load()[:1] and sorted(opened) == sorted(str(tmp_path / n) for n in
                                                                   ["ok.png", "turned.png", "bad.jpg"])
    assert capsys.readouterr().out.count("skipped 2 of 3 images") == 2
