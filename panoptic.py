"""Panoptic segmentation tuned with a PQ reward (paper section 4.1, Tables 1, 4, 5) -- WORK IN PROGRESS.

Issue 3 builds this script in steps. Here now: the official metric, `pq_compute`, equal to panopticapi's
(same arguments, same result structure, same void and crowd rules) without its multiprocessing pool and
without its crash on an empty group; and the reward's core, `pq_counts` (PQ's per-image counts, in memory,
vectorized). Still to come: the UViM stage II language model over the VQ codes of vqvae.py, decoding,
the stages (mle / reward / mle_cont / eval) and the COCO loader.

    from panoptic import pq_compute
    results = pq_compute("panoptic_val2017.json", "predictions.json", "panoptic_val2017/", "predictions/")
    results["All"]["pq"], results["Things"]["n"], results["per_class"][1]["sq"]
"""
import json
import os

import numpy as np
import torch
from PIL import Image

import common
from common import UserError

# -----------------------------------------------------------------------------
# reward: PQ's counts per image, in memory and vectorized (no files, no Python loop over segments)


def pq_counts(gt, gt_cat, gt_crowd, pred, pred_cat):
    """Per-image TP / FP / FN and summed matched IoU under pq_compute's rules, for a batch.
    gt (N, H, W) segment index 0..G (0 = void), gt_cat (N, G+1) category (-1: no such segment), gt_crowd
    (N, G+1) bool; pred (N, H, W) segment index 0..S (0 = unlabelled), pred_cat (N, S+1) -> dict of (N,)."""
    N, G1, S1 = gt_cat.shape[0], gt_cat.shape[1], pred_cat.shape[1]
    idx = (torch.arange(N, device=gt.device)[:, None] * G1 + gt.flatten(1)) * S1 + pred.flatten(1)
    inter = torch.bincount(idx.flatten(), minlength=N * G1 * S1).view(N, G1, S1).double()  # joint histogram
    g_area, p_area, on_void = inter.sum(2), inter.sum(1), inter[:, 0]  # (N, G1), (N, S1), (N, S1)
    iou = inter / (p_area[:, None] + g_area[:, :, None] - inter - on_void[:, None]).clamp(min=1)
    g_ok, p_ok = gt_cat >= 0, (p_area > 0) & (pred_cat >= 0)
    g_ok[:, 0], p_ok[:, 0] = False, False
    same = gt_cat[:, :, None] == pred_cat[:, None, :]  # (N, G1, S1)
    match = (iou > 0.5) & same & (g_ok & ~gt_crowd)[:, :, None] & p_ok[:, None]
    # one crowd region per category counts, the last listed (as panopticapi's dict)
    later = torch.ones(G1, G1, dtype=torch.bool, device=gt.device).triu(1)  # later[i, j]: j after i
    crowd = g_ok & gt_crowd
    last = crowd & ~(crowd[:, None, :] & (gt_cat[:, :, None] == gt_cat[:, None, :]) & later).any(2)
    excused = on_void + (inter * (last[:, :, None] & same)).sum(1)  # pred pixels on void or own-class crowd
    fp = p_ok & ~match.any(1) & ~(excused / p_area.clamp(min=1) > 0.5)
    return dict(iou=(iou * match).sum((1, 2)), tp=match.sum((1, 2)), fp=fp.sum(1),
                fn=(g_ok & ~gt_crowd & ~match.any(2)).sum(1))


def pq_reward(counts, fp_weight=0.3):
    """The panoptic reward of one image: r = sum of matched IoUs - 0.3 x false-positive segments."""
    return counts["iou"] - fp_weight * counts["fp"]


# -----------------------------------------------------------------------------
# metric: COCO panoptic format, PQ as panopticapi computes it

VOID, OFFSET = 0, 256 ** 3


def rgb2id(png):
    """(H, W, 3) uint8 colours -> (H, W) segment ids: R + 256 G + 256^2 B (0 = void)."""
    png = png.astype(np.uint32)
    return png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]


def id2rgb(ids):
    """(H, W) segment ids -> (H, W, 3) uint8 colours, the inverse of rgb2id."""
    ids = np.asarray(ids, np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def read_ids(path):
    try:
        with Image.open(path) as im:
            return rgb2id(np.asarray(im.convert("RGB")))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable panoptic PNG ({type(e).__name__})")


def pq_image(gt_ids, gt_segs, pred_ids, pred_segs, stats):
    """One image: add TP / FP / FN counts and matched IoUs to stats {category: [iou, tp, fp, fn]}.
    A pair matches if same category, GT not crowd and IoU > 0.5, where IoU = |p & g| / (|p| + |g| - |p & g|
    - |p & void|) with |g| the GT json's area. Unmatched non-crowd GT: FN. Unmatched prediction: FP unless
    more than half of it lies on void or on a crowd region of its category."""
    pairs, counts = np.unique(gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64), return_counts=True)
    inter = {(int(k // OFFSET), int(k % OFFSET)): int(c) for k, c in zip(pairs, counts)}
    gt_matched, pred_matched = set(), set()
    for (g, q), n in inter.items():
        if g not in gt_segs or q not in pred_segs or gt_segs[g].get("iscrowd", 0) == 1:
            continue
        if gt_segs[g]["category_id"] != pred_segs[q]["category_id"]:
            continue
        iou = n / (pred_segs[q]["area"] + gt_segs[g]["area"] - n - inter.get((VOID, q), 0))
        if iou > 0.5:
            s = stats.setdefault(gt_segs[g]["category_id"], [0.0, 0, 0, 0])
            s[0], s[1] = s[0] + iou, s[1] + 1
            gt_matched.add(g)
            pred_matched.add(q)
    crowd = {}
    for g, seg in gt_segs.items():
        if g in gt_matched:
            continue
        if seg.get("iscrowd", 0) == 1:
            crowd[seg["category_id"]] = g  # one crowd region per category (panopticapi keeps the last)
            continue
        stats.setdefault(seg["category_id"], [0.0, 0, 0, 0])[3] += 1
    for q, seg in pred_segs.items():
        if q in pred_matched:
            continue
        ignored = inter.get((VOID, q), 0)
        if seg["category_id"] in crowd:
            ignored += inter.get((crowd[seg["category_id"]], q), 0)
        if ignored / seg["area"] > 0.5:
            continue
        stats.setdefault(seg["category_id"], [0.0, 0, 0, 0])[2] += 1


def pq_average(stats, categories, isthing):
    """Mean over the categories of the group that occur (TP + FP + FN > 0): PQ, SQ, RQ each averaged on
    its own. An empty group gives zeros and n = 0 (panopticapi divides by zero there)."""
    total, per_class = dict(pq=0.0, sq=0.0, rq=0.0, n=0), {}
    for c, info in categories.items():
        if isthing is not None and (info.get("isthing", 0) == 1) != isthing:
            continue
        iou, tp, fp, fn = stats.get(c, [0.0, 0, 0, 0])
        if tp + fp + fn == 0:
            per_class[c] = dict(pq=0.0, sq=0.0, rq=0.0)
            continue
        r = dict(pq=iou / (tp + 0.5 * fp + 0.5 * fn), sq=iou / tp if tp else 0.0, rq=tp / (tp + 0.5 * fp + 0.5 * fn))
        per_class[c] = r
        total["n"] += 1
        for k in ("pq", "sq", "rq"):
            total[k] += r[k]
    for k in ("pq", "sq", "rq"):
        total[k] = total[k] / total["n"] if total["n"] else 0.0
    return total, per_class


def pq_compute(gt_json_file, pred_json_file, gt_folder=None, pred_folder=None):
    """panopticapi's pq_compute: {"All" | "Things" | "Stuff": {pq, sq, rq, n}, "per_class": {category id:
    {pq, sq, rq}}}, values in [0, 1]. Folders default to the json paths without '.json'."""
    def load(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a readable panoptic json ({type(e).__name__})")
    gt_json, pred_json = load(gt_json_file), load(pred_json_file)
    gt_folder = gt_folder or gt_json_file.replace(".json", "")
    pred_folder = pred_folder or pred_json_file.replace(".json", "")
    for d in (gt_folder, pred_folder):
        if not os.path.isdir(d):
            raise UserError(f"{d}: no such folder of panoptic PNGs")
    try:
        categories = {c["id"]: c for c in gt_json["categories"]}
        preds = {a["image_id"]: a for a in pred_json["annotations"]}
        stats = {}
        for gt in gt_json["annotations"]:
            if gt["image_id"] not in preds:
                raise UserError(f"{pred_json_file}: no prediction for the image with id {gt['image_id']}")
            pred = preds[gt["image_id"]]
            gt_segs = {s["id"]: s for s in gt["segments_info"]}
            pred_segs = {s["id"]: dict(s) for s in pred["segments_info"]}
            pred_ids = read_ids(os.path.join(pred_folder, pred["file_name"]))
            ids, counts = np.unique(pred_ids, return_counts=True)
            for q, n in zip(ids.tolist(), counts.tolist()):  # predicted areas come from the PNG
                if q == VOID:
                    continue
                if q not in pred_segs:
                    raise UserError(f"{pred['file_name']}: segment {q} is in the PNG and not in the json")
                if pred_segs[q]["category_id"] not in categories:
                    raise UserError(f"{pred['file_name']}: segment {q} has unknown category_id "
                                    f"{pred_segs[q]['category_id']}")
                pred_segs[q]["area"] = n
            missing = sorted(set(pred_segs) - set(ids.tolist()))
            if missing:
                raise UserError(f"{pred['file_name']}: segments {missing} are in the json and not in the PNG")
            gt_ids = read_ids(os.path.join(gt_folder, gt["file_name"]))
            if gt_ids.shape != pred_ids.shape:
                raise UserError(f"{pred['file_name']}: {pred_ids.shape} pixels, ground truth {gt_ids.shape}")
            pq_image(gt_ids, gt_segs, pred_ids, pred_segs, stats)
    except (KeyError, TypeError) as e:
        raise UserError(f"{gt_json_file} / {pred_json_file}: malformed COCO panoptic json (missing {e})")
    results = {}
    for name, isthing in [("All", None), ("Things", True), ("Stuff", False)]:
        results[name], per_class = pq_average(stats, categories, isthing)
        if name == "All":
            results["per_class"] = per_class
    return results


def main():
    raise UserError("panoptic.py: the model stages are not written yet (issue 3); pq_compute is importable")


if __name__ == "__main__":
    common.run(main)
