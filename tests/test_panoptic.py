"""panoptic.pq_compute on hand-made COCO panoptic fixtures (every expected number derived in the comments) and
against panopticapi itself on random ones.
Run: python -m pytest -q tests/test_panoptic.py"""
import json
import os

import numpy as np
import torch
import pytest
from PIL import Image

import panoptic
from common import UserError

CATS = [dict(id=1, name="square", isthing=1), dict(id=2, name="circle", isthing=1),
        dict(id=6, name="sky", isthing=0), dict(id=7, name="grass", isthing=0)]


def grid(rows):
    """['1122', ...] -> (H, W) ids; '.' = void (0)."""
    return np.array([[0 if c == "." else int(c) for c in r] for r in rows], np.uint32)


def write(root, gt, gt_segs, pred, pred_segs, cats=CATS):
    """One image: gt / pred id grids and their segments {id: category} (gt: (category, iscrowd))."""
    for kind, ids in [("gt", gt), ("pred", pred)]:
        os.makedirs(root / kind, exist_ok=True)
        Image.fromarray(panoptic.id2rgb(ids)).save(root / kind / "a.png")
    gseg = [dict(id=i, category_id=c, iscrowd=k, area=int((gt == i).sum())) for i, (c, k) in gt_segs.items()]
    with open(root / "gt.json", "w") as f:
        json.dump(dict(categories=cats, annotations=[dict(image_id=5, file_name="a.png", segments_info=gseg)]), f)
    pseg = [dict(id=i, category_id=c) for i, c in pred_segs.items()]
    with open(root / "pred.json", "w") as f:
        json.dump(dict(annotations=[dict(image_id=5, file_name="a.png", segments_info=pseg)]), f)
    return panoptic.pq_compute(str(root / "gt.json"), str(root / "pred.json"))


def close(r, pq, sq, rq, n):
    assert r["n"] == n
    assert (r["pq"], r["sq"], r["rq"]) == pytest.approx((pq, sq, rq))


def test_id_colour_round_trip():
    ids = np.array([[0, 1, 255], [256, 65536 + 7, 256 ** 3 - 1]], np.uint32)
    assert (panoptic.rgb2id(panoptic.id2rgb(ids)) == ids).all()


def test_perfect_match(tmp_path):
    g = grid(["1122", "1122", "1122", "1122"])
    r = write(tmp_path, g, {1: (1, 0), 2: (6, 0)}, g, {1: 1, 2: 6})
    close(r["All"], 1, 1, 1, 2), close(r["Things"], 1, 1, 1, 1), close(r["Stuff"], 1, 1, 1, 1)
    assert r["per_class"][2] == dict(pq=0.0, sq=0.0, rq=0.0) and r["per_class"][1]["pq"] == 1


def test_iou_exactly_half_is_not_a_match(tmp_path):
    # GT square A = top row (4 px); the rest is sky B (12 px). Pred square P1 = 2 px inside A; sky P2 = the other 14.
    # IoU(P1, A) = 2 / (2 + 4 - 2) = 0.5: not > 0.5 -> square: FN 1, FP 1 -> pq = sq = rq = 0.
    # IoU(P2, B) = 12 / (14 + 12 - 12) = 6/7 -> sky: TP, pq = sq = 6/7, rq = 1.
    g = grid(["1111", "2222", "2222", "2222"])
    p = grid(["1122", "2222", "2222", "2222"])
    r = write(tmp_path, g, {1: (1, 0), 2: (6, 0)}, p, {1: 1, 2: 6})
    close(r["All"], 3 / 7, 3 / 7, 0.5, 2), close(r["Things"], 0, 0, 0, 1), close(r["Stuff"], 6 / 7, 6 / 7, 1, 1)


def test_prediction_mostly_on_void_is_not_a_false_positive(tmp_path):
    # GT: top row void, the rest sky (12 px). Pred square P1 = top row + 1 px of sky: 4 of 5 px (80%) on void
    # -> ignored. Pred sky P2 = the other 11 px: IoU = 11 / (11 + 12 - 11 - 0) = 11/12.
    g = grid(["....", "2222", "2222", "2222"])
    p = grid(["1111", "1222", "2222", "2222"])
    r = write(tmp_path, g, {2: (6, 0)}, p, {1: 1, 2: 6})
    close(r["All"], 11 / 12, 11 / 12, 1, 1)
    close(r["Things"], 0, 0, 0, 0)  # no thing occurs: an empty group, no ZeroDivisionError
    # Pred square = 2 void px + 3 sky px: 40% on void -> a false positive (square counted, pq 0).
    # Pred sky P2 = 9 px, none on void (the prediction leaves 2 px unlabelled): IoU = 9 / (9 + 12 - 9) = 0.75.
    p = grid(["11..", "1112", "2222", "2222"])
    r = write(tmp_path / "b", g, {2: (6, 0)}, p, {1: 1, 2: 6})
    close(r["Things"], 0, 0, 0, 1), close(r["Stuff"], 0.75, 0.75, 1, 1)


def test_small_and_large_things_split_at_the_median_gt_thing_area(tmp_path):
    # GT things: square 1 (2 px), circle 2 (8 px), square 3 (4 px); sky 9 the other 22. Sorted thing areas 2, 4, 8:
    # median (the middle one) 4, so small = area < 4: square 1 only. Pred: 1 and 2 exact (TP), square 3 painted sky
    # (FN, by its GT area 4: large), a circle 5 of 4 px on the sky (FP, by its own area: large).
    g = grid(["119999", "999999", "992222", "992222", "999999", "333399"])
    p = grid(["119999", "999999", "992222", "992222", "555599", "999999"])
    r = write(tmp_path, g, {1: (1, 0), 2: (2, 0), 3: (1, 0), 9: (6, 0)}, p, {1: 1, 2: 2, 5: 2, 9: 6})
    assert r["split_area"] == 4 and r["fp_per_image"] == 1
    close(r["Things small"], 1, 1, 1, 1)  # square: TP 1, IoU 1; no small circle at all
    # large: square FN 1 -> 0; circle TP 1 (IoU 1) + FP 1 -> pq = rq = 1 / (1 + 0.5), sq 1: mean over the two
    close(r["Things large"], (0 + 2 / 3) / 2, (0 + 1) / 2, (0 + 2 / 3) / 2, 2)
    # panopticapi's groups are unchanged by the split: square TP 1 + FN 1, circle TP 1 + FP 1 -> 2/3 each
    close(r["Things"], 2 / 3, 1, 2 / 3, 2)
    close(r["Stuff"], 18 / 26, 18 / 26, 1, 1)  # sky: 18 px shared, 22 GT, 22 predicted


def test_crowd_region(tmp_path):
    # GT: left half a crowd of squares (8 px), right half sky (8 px). Pred square on one crowd column: never a
    # match, 100% on a crowd of its own category -> ignored; the crowd is never a FN. Pred circle on the other
    # crowd column: a crowd of another category does not excuse it -> circle FP. Sky matches exactly.
    g = grid(["1122", "1122", "1122", "1122"])
    p = grid(["3122", "3122", "3122", "3122"])
    r = write(tmp_path, g, {1: (1, 1), 2: (6, 0)}, p, {1: 1, 2: 6, 3: 2})
    assert r["per_class"][1] == dict(pq=0.0, sq=0.0, rq=0.0)  # the square category does not occur
    close(r["Things"], 0, 0, 0, 1)  # circle: FP 1
    close(r["All"], 0.5, 0.5, 0.5, 2)  # (0 + 1) / 2 for pq, sq and rq


def test_class_absent_from_ground_truth(tmp_path):
    # GT: all sky (16 px). Pred circle on 4 px (FP: circle occurs only in the prediction), sky on 12:
    # IoU = 12 / (12 + 16 - 12) = 0.75. All: pq = (0.75 + 0) / 2, sq = (0.75 + 0) / 2, rq = (1 + 0) / 2.
    g = grid(["2222", "2222", "2222", "2222"])
    p = grid(["1122", "1122", "2222", "2222"])
    r = write(tmp_path, g, {2: (6, 0)}, p, {1: 2, 2: 6})
    close(r["All"], 0.375, 0.375, 0.5, 2), close(r["Things"], 0, 0, 0, 1), close(r["Stuff"], 0.75, 0.75, 1, 1)


def test_things_only_dataset(tmp_path):
    g = grid(["11..", "11..", "....", "...."])
    r = write(tmp_path, g, {1: (1, 0)}, g, {1: 1}, cats=CATS[:2])
    close(r["All"], 1, 1, 1, 1), close(r["Things"], 1, 1, 1, 1), close(r["Stuff"], 0, 0, 0, 0)


def test_stuff_class_split_in_two(tmp_path):
    # GT: all sky (16 px). Pred: sky in two segments, 10 px and 6 px. IoU 10/16 = 0.625 -> TP; 6/16 -> FP.
    # sky: pq = 0.625 / (1 + 0.5), sq = 0.625, rq = 1 / 1.5.
    g = grid(["2222", "2222", "2222", "2222"])
    p = grid(["2222", "2222", "2233", "3333"])
    r = write(tmp_path, g, {2: (6, 0)}, p, {2: 6, 3: 6})
    close(r["All"], 0.625 / 1.5, 0.625, 1 / 1.5, 1)
    assert r["per_class"][6]["pq"] == pytest.approx(0.625 / 1.5)


def test_eval_gives_a_stuff_class_one_segment_as_panopticapis_converter(tmp_path):
    # UViM's decoding gives every instance slot its own segment, stuff too: here sky (class 3 = CATS[2]) in slots 1
    # and 2, the circle (class 2) in slots 3 and 4, slot 5 unused. UViM's eval writes COCO's format with panopticapi's
    # two-channel converter, which gives a stuff class one segment and each thing instance its own: sky = slots 1 + 2
    # (12 px, named 1), the circle's pieces stay two (2 px each).
    seg = torch.tensor([[[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 3, 4], [2, 2, 3, 4]]])
    (sg, cats), = panoptic.as_segments(seg, torch.tensor([[-1, 3, 3, 2, 2, 2]]), CATS)
    assert (sg == np.array([[1] * 4, [1] * 4, [1, 1, 3, 4], [1, 1, 3, 4]])).all() and cats == {1: 6, 3: 2, 4: 2}
    # GT: sky 12 px, one circle of 4 px. Sky: IoU 12/12 -> TP, pq 1 (unmerged: 8/12 and a false positive).
    # Circle: each piece IoU 2/4 = 0.5, not > 0.5 -> FN 1, FP 2 -> pq 0.
    r = write(tmp_path, grid(["2222", "2222", "2211", "2211"]), {1: (2, 0), 2: (6, 0)}, sg, cats)
    assert r["per_class"][6] == pytest.approx(dict(pq=1, sq=1, rq=1)) and r["per_class"][2]["pq"] == 0
    assert r["fp_per_image"] == 2


def test_malformed_pairs_are_clear_errors(tmp_path):
    g = grid(["1122", "1122", "1122", "1122"])
    with pytest.raises(UserError, match="segment 2 is in the PNG and not in the json"):
        write(tmp_path / "a", g, {1: (1, 0), 2: (6, 0)}, g, {1: 1})
    with pytest.raises(UserError, match=r"segments \[9\] are in the json and not in the PNG"):
        write(tmp_path / "b", g, {1: (1, 0), 2: (6, 0)}, g, {1: 1, 2: 6, 9: 1})
    with pytest.raises(UserError, match="unknown category_id 4"):
        write(tmp_path / "c", g, {1: (1, 0), 2: (6, 0)}, g, {1: 1, 2: 4})
    write(tmp_path / "d", g, {1: (1, 0), 2: (6, 0)}, g, {1: 1, 2: 6})
    (tmp_path / "d" / "pred" / "a.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="a.png: not a readable panoptic PNG"):
        panoptic.pq_compute(str(tmp_path / "d/gt.json"), str(tmp_path / "d/pred.json"))
    (tmp_path / "d" / "pred.json").write_text("{")
    with pytest.raises(UserError, match="pred.json: not a readable panoptic json"):
        panoptic.pq_compute(str(tmp_path / "d/gt.json"), str(tmp_path / "d/pred.json"))


def random_pair(rng, H=12, W=12):
    """A random GT (void, several categories, crowd) and a prediction that copies, moves, splits and
    relabels its segments, with unlabelled pixels."""
    G = int(rng.integers(1, 7))
    gt = rng.integers(0, G + 1, (H // 3, W // 3)).repeat(3, 0).repeat(3, 1)  # blocky segments
    gt = np.where(rng.random((H, W)) < 0.08, 0, gt)  # some void pixels
    gt_cat = np.concatenate([[-1], rng.choice([1, 2, 6, 7], G)])
    gt_crowd = np.concatenate([[False], rng.random(G) < 0.2])
    pred = np.roll(gt, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 2)))
    pred = np.where(rng.random((H, W)) < 0.15, rng.integers(0, G + 3, (H, W)), pred)  # noise, new segments
    S = int(pred.max())
    cats = np.where(rng.random(S) < 0.7, np.resize(gt_cat[1:], S), rng.choice([1, 2, 6, 7], S))  # mostly GT's
    pred_cat = np.concatenate([[-1], cats])
    return gt, gt_cat, gt_crowd, pred, pred_cat


def test_in_memory_counts_agree_with_pq_compute_per_image():
    rng = np.random.default_rng(0)
    pairs = [random_pair(rng) for _ in range(200)]
    G1 = max(len(p[1]) for p in pairs)
    S1 = max(len(p[4]) for p in pairs)
    padded = lambda a, n, fill: np.concatenate([a, np.full(n - len(a), fill, a.dtype)])  # noqa: E731
    c = panoptic.pq_counts(torch.tensor(np.stack([p[0] for p in pairs])),
                           torch.tensor(np.stack([padded(p[1], G1, -1) for p in pairs])),
                           torch.tensor(np.stack([padded(p[2], G1, False) for p in pairs])),
                           torch.tensor(np.stack([p[3] for p in pairs])),
                           torch.tensor(np.stack([padded(p[4], S1, -1) for p in pairs])))
    r, _ = panoptic.reward_pq((torch.tensor(np.stack([p[3] for p in pairs]))[:, None],
                               torch.tensor(np.stack([padded(p[4], S1, -1) for p in pairs]))[:, None]),
                              dict(gt=torch.tensor(np.stack([p[0] for p in pairs])),
                                   gt_cat=torch.tensor(np.stack([padded(p[1], G1, -1) for p in pairs])),
                                   gt_crowd=torch.tensor(np.stack([padded(p[2], G1, False) for p in pairs]))))
    seen = np.zeros(4)
    for i, (gt, gt_cat, gt_crowd, pred, pred_cat) in enumerate(pairs):
        gs = {g: dict(category_id=int(gt_cat[g]), iscrowd=int(gt_crowd[g]), area=int((gt == g).sum()))
              for g in range(1, len(gt_cat))}
        ps = {q: dict(category_id=int(pred_cat[q]), area=int((pred == q).sum())) for q in range(1, len(pred_cat))
              if (pred == q).any()}
        stats = {}  # the per-image counts pq_compute accumulates (pq_image is its per-image step)
        panoptic.pq_image(gt.astype(np.uint32), gs, pred.astype(np.uint32), ps, stats)
        iou, tp, fp, fn = (sum(s[k] for s in stats.values()) for k in range(4))
        assert (c["tp"][i], c["fp"][i], c["fn"][i]) == (tp, fp, fn), i
        assert float(c["iou"][i]) == pytest.approx(iou, abs=1e-12)
        assert float(r[i, 0]) == pytest.approx(iou - 0.3 * fp, abs=1e-5)  # the reward: matched IoUs - 0.3 x FPs
        seen += [tp > 0, fp > 0, fn > 0, any(gs[g]["iscrowd"] for g in gs)]
    assert (seen > 20).all()  # the random cases exercise matches, false positives, misses and crowds


def test_pq_compute_equals_panopticapi_on_random_images(tmp_path):
    """The official evaluation (panopticapi's pq_compute_single_core and PQStat.pq_average; PyPI's panopticapi-lite,
    installed with --no-deps: see .ci/run) and ours on the same 300 files: void, crowd regions (several of one category
    in an image: panopticapi keeps the last for the false-positive rule), moved / split / relabelled segments."""
    from panopticapi.evaluation import pq_compute_single_core
    rng, cats = np.random.default_rng(1), {c["id"]: c for c in CATS}
    gt_anns, pred_anns, two_crowds = [], [], 0
    for kind in ("gt", "pred"):
        os.makedirs(tmp_path / kind)
    for i in range(300):
        gt, gt_cat, gt_crowd, pred, pred_cat = random_pair(rng)
        for kind, ids in (("gt", gt), ("pred", pred)):
            Image.fromarray(panoptic.id2rgb(ids)).save(tmp_path / kind / f"{i}.png")
        gt_anns.append(dict(image_id=i, file_name=f"{i}.png", segments_info=[
            dict(id=g, category_id=int(gt_cat[g]), iscrowd=int(gt_crowd[g]), area=int((gt == g).sum()))
            for g in range(1, len(gt_cat))]))  # ids absent from the PNG too (area 0: a miss for both)
        pred_anns.append(dict(image_id=i, file_name=f"{i}.png", segments_info=[
            dict(id=q, category_id=int(pred_cat[q])) for q in range(1, len(pred_cat)) if (pred == q).any()]))
        crowd_cats = gt_cat[1:][gt_crowd[1:]]
        two_crowds += len(crowd_cats) > len(set(crowd_cats.tolist()))
    with open(tmp_path / "gt.json", "w") as f:
        json.dump(dict(categories=CATS, annotations=gt_anns), f)
    with open(tmp_path / "pred.json", "w") as f:
        json.dump(dict(annotations=pred_anns), f)
    ours = panoptic.pq_compute(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"))
    ref = pq_compute_single_core(0, list(zip(gt_anns, pred_anns)), str(tmp_path / "gt"), str(tmp_path / "pred"), cats)
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        total, per_class = ref.pq_average(cats, isthing)
        assert ours[name]["n"] == total["n"] == (4 if isthing is None else 2)
        assert [ours[name][k] for k in ("pq", "sq", "rq")] == pytest.approx([total[k] for k in ("pq", "sq", "rq")],
                                                                              abs=1e-12)
        for c, r in per_class.items():
            assert [ours["per_class"][c][k] for k in ("pq", "sq", "rq")] == pytest.approx(list(r.values()), abs=1e-12)
    assert ours["fp_per_image"] == sum(s.fp for s in ref.pq_per_cat.values()) / 300
    assert two_crowds > 5 and 0.2 < ours["All"]["pq"] < 0.9  # the hard cases occur; neither perfect nor empty


def test_reward_scores_each_of_k_samples_against_its_own_image():
    # B = 2 images, K = 3 different segmentations each; ground truth index -> category: 1 square, 2 circle, 3 sky.
    gt = torch.tensor(np.stack([grid(["1122", "1122", "3333", "3333"]), grid(["....", "3333", "3333", "3333"])]),
                      dtype=torch.long)
    gt_cat, gt_crowd = torch.tensor([[-1, 1, 2, 6], [-1, -1, -1, 6]]), torch.zeros(2, 4, dtype=torch.bool)
    seg = torch.tensor(np.stack([np.stack([grid(["1122", "1122", "3333", "3333"]), grid(["3333"] * 4),
                                           grid(["1122", "1122", "3333", "3333"])]),
                                 np.stack([grid(["3333"] * 4), grid(["1111", "1111", "3333", "3333"]),
                                           grid(["...."] * 4)])]), dtype=torch.long)  # (B, K, H, W)
    cat = torch.tensor([[[-1, 1, 2, 6], [-1, -1, -1, 6], [-1, 1, 1, 6]],
                        [[-1, -1, -1, 6], [-1, 2, -1, 6], [-1, -1, -1, -1]]])  # (B, K, S + 1)
    r, aux = panoptic.reward_pq((seg, cat), dict(gt=gt, gt_cat=gt_cat, gt_crowd=gt_crowd))
    # image 0: a copy (3 IoUs of 1) | all sky: IoU 8 / 16 = 0.5 is no match, 1 FP | the circle named a square: FP
    # image 1: sky over the void row too: IoU 12 / (16 + 12 - 12 - 4 on void) = 1 | a circle half on void (not more
    # than half: FP) and sky on the last two rows, IoU 8 / 12 | nothing predicted: 0
    expect = [[3.0, -0.3, 2 - 0.3], [1.0, 8 / 12 - 0.3, 0.0]]
    torch.testing.assert_close(r, torch.tensor(expect), rtol=0, atol=1e-6)
    for b in range(2):
        for k in range(3):  # each sample scores as it would alone (K = 1)
            alone, _ = panoptic.reward_pq((seg[b:b + 1, k:k + 1], cat[b:b + 1, k:k + 1]),
                                          dict(gt=gt[b:b + 1], gt_cat=gt_cat[b:b + 1], gt_crowd=gt_crowd[b:b + 1]))
            assert float(alone) == float(r[b, k])
    # the counts, means over the 6 samples: TP 3+0+2 + 1+1+0, FP 0+1+1 + 0+1+0, FN 0+3+1 + 0+0+1
    assert (aux["tp"] * 6, aux["fp"] * 6, aux["fn"] * 6) == (7, 3, 5)


# ----------------------------------------------------------------------------- the COCO panoptic layout, end to end
COCO_CATS = [dict(id=3, name="cat", isthing=1), dict(id=17, name="dog", isthing=1),
             dict(id=120, name="wall", isthing=0), dict(id=184, name="sky", isthing=0)]  # ids with gaps


def write_coco_panoptic(root, split, sizes):
    """Images of odd sizes (one grayscale, one RGBA): the top half sky, the bottom wall, a cat box, a dog box,
    and in the first image a crowd region of dogs; the last image has stuff only."""
    os.makedirs(root / split)
    os.makedirs(root / "annotations" / f"panoptic_{split}")
    images, anns = [], []
    for k, (w, h) in enumerate(sizes):
        image_id = 100 * (split == "val") + k + 1
        ids = np.zeros((h, w), np.uint32)
        ids[: h // 2], ids[h // 2:] = 5, 6
        segs = [dict(id=5, category_id=184, iscrowd=0), dict(id=6, category_id=120, iscrowd=0)]
        if k < len(sizes) - 1:
            ids[2:h // 2, 3:w // 3], ids[h // 2:h - 2, w // 2:w - 3] = 300, 70000
            segs += [dict(id=300, category_id=3, iscrowd=0), dict(id=70000, category_id=17, iscrowd=0)]
        if k == 0:
            ids[h - 3:, :4] = 9
            segs.append(dict(id=9, category_id=17, iscrowd=1))
        ids[0, 0] = 0  # a void pixel
        for s in segs:
            s["area"] = int((ids == s["id"]).sum())
        Image.fromarray(panoptic.id2rgb(ids)).save(root / "annotations" / f"panoptic_{split}" / f"{image_id}.png")
        colour = np.random.default_rng(k).integers(0, 255, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(colour)
        img = img.convert("L") if k == 1 else img.convert("RGBA") if k == 2 else img
        img.save(root / split / f"{image_id}.png")
        images.append(dict(id=image_id, file_name=f"{image_id}.png", width=w, height=h))
        anns.append(dict(image_id=image_id, file_name=f"{image_id}.png", segments_info=segs))
    with open(root / "annotations" / f"panoptic_{split}.json", "w") as f:
        json.dump(dict(images=images, annotations=anns, categories=COCO_CATS), f)


def test_coco_panoptic_fixture_loads_trains_and_evaluates(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    write_coco_panoptic(tmp_path / "coco", "train", [(48, 40), (37, 53), (64, 64), (40, 40)])
    write_coco_panoptic(tmp_path / "coco", "val", [(45, 31), (50, 60), (33, 33)])
    data = ["--data", "coco", "--data_dir", str(tmp_path / "coco"), "--train_split", "train", "--val_split", "val",
            "--tiny", "--out_dir", str(tmp_path / "out")]
    run = lambda script, *a: subprocess.run([sys.executable, script, *data, *a], capture_output=True, text=True,
                                            cwd=root, timeout=900)  # noqa: E731
    p = run("panoptic.py", "--oracle_flags", "--instances 8 --steps 300", "--batch_size", "4", "--steps", "4")
    assert p.returncode == 0, p.stderr[-2000:]  # every stage: the oracle, mle, reward, mle_cont, eval
    oracle = torch.load(tmp_path / "out" / "vqvae_panoptic" / "ckpt.pt", weights_only=True)["config"]
    cfg = torch.load(tmp_path / "out" / "panoptic" / "mle" / "ckpt.pt", weights_only=True)["config"]
    assert (oracle["width"], oracle["image_size"], oracle["instances"]) == (64, 32, 8)  # --tiny: vqvae.TINY's
    assert (cfg["width"], cfg["image_size"], cfg["patch"]) == (128, 32, 8)  # and the tiny LM (COCO's is L/16)
    ev = tmp_path / "out" / "panoptic" / "eval"
    pred = json.load(open(ev / "pred_reward.json"))
    assert [a["image_id"] for a in pred["annotations"]] == [101, 102, 103]
    for a, size in zip(pred["annotations"], [(45, 31), (50, 60), (33, 33)]):  # written at the original size
        assert Image.open(ev / "pred_reward" / a["file_name"]).size == size
        assert {s["category_id"] for s in a["segments_info"]} <= {3, 17, 120, 184}
    # the metric ran on the original ground truth files: the oracle's row equals pq_compute on them (300 oracle steps:
    # a PQ above 0, which other ground truth would not give; at 10 steps every row was 0 against any files)
    m = json.load(open(ev / "metrics.json"))
    again = panoptic.pq_compute(str(ev / "gt.json"), str(ev / "pred_oracle.json"),
                                str(tmp_path / "coco" / "annotations" / "panoptic_val"), str(ev / "pred_oracle"))
    assert abs(100 * again["All"]["pq"] - m["oracle"]["All"]["pq"]) < 1e-9 and m["oracle"]["All"]["pq"] > 10
    # a malformed pair: a PNG the json names is missing / a segment of an unknown category -> one clear line
    os.remove(tmp_path / "coco" / "annotations" / "panoptic_val" / "102.png")
    p = run("panoptic.py", "--stage", "eval")
    assert p.returncode == 2 and "102.png: missing panoptic PNG" in p.stderr and p.stderr.count("\n") == 1
    d = json.load(open(tmp_path / "coco" / "annotations" / "panoptic_train.json"))
    d["annotations"][0]["segments_info"][0]["category_id"] = 999
    json.dump(d, open(tmp_path / "coco" / "annotations" / "panoptic_train.json", "w"))
    p = run("panoptic.py", "--stage", "oracle")
    assert p.returncode == 2 and "category_id 999" in p.stderr and p.stderr.count("\n") == 1


def test_scenes_map_category_ids_to_classes_and_crowd_to_void(tmp_path):
    write_coco_panoptic(tmp_path, "val", [(45, 31), (40, 40)])  # the last one has stuff only
    import argparse
    items, cats = panoptic.load_coco(argparse.Namespace(data_dir=str(tmp_path), val_split="val"), "val")
    # only the held-out split keeps each image's json entry (eval's gt.json); COCO's 118k training ones would stay
    # in every rank's and worker's memory
    assert items[0]["ann"]["segments_info"] and panoptic.load_coco(argparse.Namespace(
        data_dir=str(tmp_path), val_split="val2017"), "val")[0][0]["ann"] is None
    ds = panoptic.Scenes(items, cats, 8, 45)  # resize to 45 x 45
    i, img, target, sem, inst, gt, gt_cat, crowd = ds[0]
    assert img.shape == (3, 45, 45) and torch.equal(target, torch.stack([sem, inst]))
    assert set(sem.unique().tolist()) == {0, 1, 2, 3, 4}  # void, cat 3 -> 1, dog 17 -> 2, wall -> 3, sky -> 4
    assert sem[0, 0] == 0 and sem[44, 0] == 0  # the void pixel, the crowd region: void in the oracle's target
    assert gt_cat[:6].tolist() == [-1, 4, 3, 1, 2, 2] and crowd[:6].tolist() == [False] * 5 + [True]
    assert gt[44, 0] == 5 and (gt == 0).sum() == 1  # the reward still sees the crowd region (as PQ does)


def test_string_image_ids_are_written_and_scored(tmp_path):
    """Cityscapes-style ids ("frankfurt_000000_000294") name their files (a format error before)."""
    ids = grid(["1166", "1166", "..77"])
    segs = [dict(id=q, category_id=q, area=int((ids == q).sum())) for q in (1, 6, 7)]
    for kind in ["gt", "pred"]:
        panoptic.write_coco(str(tmp_path / kind), str(tmp_path / f"{kind}.json"),
                            [("frankfurt_000000_000294", ids, segs), (7, ids, segs)], CATS)
    assert sorted(os.listdir(tmp_path / "pred")) == ["7.png", "frankfurt_000000_000294.png"]
    r = panoptic.pq_compute(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"))
    close(r["All"], 1.0, 1.0, 1.0, 3)


def test_coco_splits_must_list_the_same_categories(tmp_path):
    import argparse
    write_coco_panoptic(tmp_path, "train", [(40, 40)])
    write_coco_panoptic(tmp_path, "val", [(40, 40)])
    d = json.load(open(tmp_path / "annotations" / "panoptic_val.json"))
    d["categories"].append(dict(id=200, name="boat", isthing=1))  # class 5 in val only: the oracle has no such class
    json.dump(d, open(tmp_path / "annotations" / "panoptic_val.json", "w"))
    args = argparse.Namespace(data="coco", data_dir=str(tmp_path), train_split="train", val_split="val")
    with pytest.raises(UserError, match="categories differ from --train_split"):
        panoptic.load_data(args)


@pytest.mark.parametrize("field,value", [("id", "5"), ("area", None), ("iscrowd", "no")])
def test_a_malformed_segment_is_refused_at_load_not_at_eval(tmp_path, field, value):
    """A string segment id, an area missing, iscrowd "no" (truthy: void for the oracle, not crowd for the reward) were
    read as they came and failed only in eval's pq_compute, naming our own gt.json; now the loader names the file."""
    import argparse
    write_coco_panoptic(tmp_path, "val", [(40, 40)])
    path = tmp_path / "annotations" / "panoptic_val.json"
    d = json.load(open(path))
    seg = d["annotations"][0]["segments_info"][0]
    if value is None:
        del seg[field]
    else:
        seg[field] = value
    json.dump(d, open(path, "w"))
    args = argparse.Namespace(data="coco", data_dir=str(tmp_path), val_split="val")
    with pytest.raises(UserError, match=r"panoptic_val.json: (segment .*needs an int id, a number area, iscrowd 0 or 1|"
                                        r"malformed COCO panoptic json \(KeyError: 'area'\))"):
        panoptic.load_coco(args, "val")
    seg[field] = {"id": 5, "area": seg.get("area", 1), "iscrowd": 1}[field]  # the same file, well-formed: loads
    json.dump(d, open(path, "w"))
    assert len(panoptic.load_coco(args, "val")[0]) == 1
