"""Panoptic segmentation tuned with a PQ reward (paper section 4.1, Tables 1, 4, 5; UViM, Kolesnikov et al. 2022).

Stage I (`--stage oracle`: vqvae.py's VQ-VAE trained on these scenes) learns 256 codes of a panoptic map given
the image. Stage II: a ViT reads the image, a decoder writes the codes (token = code + 1, BOS 0), the frozen oracle
decodes them to class and instance logits, UViM's decoding makes segments. MLE imitates the oracle's codes of the
ground truth; the reward stage samples K code sequences, scores each with r = matched IoUs - 0.3 x false positives
(PQ's rules) and raises the likelihood of those above the mean of the other K-1. `pq_compute` is panopticapi's.

    python panoptic.py              # the synthetic world, every stage: oracle, encoder, mle, reward, mle_cont, eval
    python panoptic.py --tiny       # every stage in about a minute (smoke test)
    python panoptic.py --stage oracle|encoder|mle|reward|mle_cont|eval
    python panoptic.py --stage oracle --oracle_flags "--steps 4000 --width 256"   # vqvae.py's flags

    from panoptic import pq_compute
    results = pq_compute("panoptic_val2017.json", "predictions.json", "panoptic_val2017/", "predictions/")
    results["All"]["pq"], results["Things"]["n"], results["per_class"][1]["sq"]

Measured: see the README (results/panoptic/).
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

import common
import vqvae
from common import UserError

# ---- config: one flat block; presets per data source, explicit flags override ----------------------------------------
PRESETS = {
    # MLE to convergence (MLE continued gains < 0.5 PQ), then K = 8 at T = 0.5 (results/panoptic/probes/README.md)
    "synthetic": dict(model="tiny", patch=8, dec_layers=3, batch_size=16, mle_steps=2400, mle_lr=1e-3,
                      mle_warmup=100, mle_wd=0.05, reward_steps=300, reward_lr=3e-5, reward_warmup=0, reward_wd=0.0,
                      enc_lr_mult=1.0, samples=8, eval_images=300, num_train=10000, num_val=300, enc_steps=2500,
                      enc_lr=1e-3, enc_warmup=100, enc_wd=0.05, temperature=0.5),
    # the paper's Table 5 (ViT-L/16, 24 decoder layers, 512 px); MLE: UViM's stage II (44.6k steps, lr 1e-3)
    "coco": dict(model="L/16", patch=16, dec_layers=24, batch_size=128, mle_steps=44600, mle_lr=1e-3, mle_warmup=4000,
                 mle_wd=1e-6, reward_steps=30000, reward_lr=1e-6, reward_warmup=4000, reward_wd=0.0, enc_lr_mult=0.1,
                 samples=2, eval_images=5000, num_train=0, num_val=0, temperature=1.0)}
TINY = dict(model="tiny", patch=8, dec_layers=2, batch_size=8, mle_steps=30, reward_steps=10, eval_images=8,
            num_train=64, num_val=8, mle_warmup=5, samples=2, enc_steps=10, enc_warmup=2)
# --tiny, any --data: the tiny model too (COCO's L/16: ~2 min a step); image size: the oracle's (vqvae.TINY: 32 px)

p = argparse.ArgumentParser(description=__doc__, formatter_class=common.Help)
p.add_argument("--stage", default="all", choices=["oracle", "encoder", "mle", "reward", "mle_cont", "eval", "all"],
               help="oracle: UViM's stage I, vqvae.py's VQ-VAE on these scenes (out/vqvae_panoptic/); encoder: "
                    "the ViT learns the synthetic world's pixel classes (a stand-in for a pretrained ViT); mle: "
                    "pretrain; reward: tune from out/panoptic/mle; mle_cont: the fair control, MLE from the same "
                    "start at the reward stage's lr, warmup, schedule, steps (from its checkpoint); eval: every "
                    "checkpoint side by side; all: each in turn (an oracle trained with the same flags is reused)")
p.add_argument("--data", default="synthetic", choices=["synthetic", "coco"], help="data source, picks the preset")
p.add_argument("--data_dir", default="", help="COCO root: annotations/panoptic_<split>.json, ...")
p.add_argument("--train_split", default="train2017", help="COCO training split name")
p.add_argument("--val_split", default="val2017", help="COCO held-out split name")
p.add_argument("--oracle", default="", help="stage I checkpoint (default: out_dir/vqvae_panoptic/ckpt.pt)")
p.add_argument("--oracle_flags", default="", help="--stage oracle: vqvae.py's flags (python vqvae.py --help; default: "
               "its preset), e.g. \"--steps 4000 --width 256\" or --oracle_flags=--no-local; --data --data_dir "
               "--train_split --val_split --out_dir --seed --resume --tiny --workers --compile are this script's")
p.add_argument("--out_dir", default="out", help="stages write out_dir/panoptic/<stage>/")
p.add_argument("--model", default=None, help="ViT size: tiny, S/16, B/16, L/16 (preset)")
p.add_argument("--patch", type=int, default=None, help="patch size when --model has none (tiny; preset)")
p.add_argument("--dec_layers", type=int, default=None, help="decoder depth (UViM: 24; preset)")
p.add_argument("--init_encoder", default="", help="mle stage's ViT weights: timm naming or encoder.pt (default: "
               "out_dir/panoptic/encoder/encoder.pt of --stage encoder, if it exists)")
p.add_argument("--batch_size", type=int, default=None, help="global batch of images, split over processes (preset)")
p.add_argument("--micro_batch", type=int, default=0, help="per-process micro-batch: training, eval (0: whole / 50)")
p.add_argument("--steps", type=int, default=None, help="steps of this stage (preset; mle_cont: the reward stage's)")
p.add_argument("--lr", type=float, default=None, help="peak learning rate of this stage (preset)")
p.add_argument("--warmup", type=int, default=None, help="linear warmup steps of this stage (preset)")
p.add_argument("--wd", type=float, default=None, help="decoupled weight decay of this stage (preset)")
p.add_argument("--enc_lr_mult", type=float, default=None, help="encoder learning rate = lr x this (UViM: 0.1; preset)")
p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"], help="optimizer (encoder stage: adamw)")
p.add_argument("--clip", type=float, default=1.0, help="gradient clipping by global norm (0: off)")
p.add_argument("--samples", type=int, default=None, help="segmentations sampled per image when tuning (K; preset)")
p.add_argument("--baseline", default="loo", choices=["none", "independent", "loo"],
               help="reward baseline: none, another sample's reward (paper Alg. 2), mean of the other K-1")
p.add_argument("--grad_on", default="all", choices=["first", "all"], help="train on sample 0 only or all K")
p.add_argument("--temperature", type=float, default=None, help="sampling temperature in the reward stage (preset)")
p.add_argument("--min_segment", type=int, default=0, help="decoding: smaller segments (pixels) become void")
p.add_argument("--reward", default="pq", help="reward to optimize, a key of REWARDS: pq")
p.add_argument("--init", default="", help="checkpoint the (first) stage starts from (default: the previous stage's)")
p.add_argument("--resume", action="store_true", help="continue this stage from its own last checkpoint")
p.add_argument("--stop_at", type=int, default=0, help="exit unsaved after this mle/reward/mle_cont step (preempted)")
p.add_argument("--compile", action="store_true", help="torch.compile the training forward (not the encoder stage)")
p.add_argument("--seed", type=int, default=0, help="seed of init, data order and sampling noise")
p.add_argument("--log_every", type=int, default=50, help="print a line every this many steps")
p.add_argument("--eval_every", type=int, default=0, help="held-out PQ every this many steps (0: at the end)")
p.add_argument("--ckpt_every", type=int, default=500, help="checkpoint every this many steps")
p.add_argument("--eval_images", type=int, default=None, help="held-out images to evaluate (preset)")
p.add_argument("--num_train", type=int, default=None, help="synthetic training scenes (preset)")
p.add_argument("--num_val", type=int, default=None, help="synthetic held-out scenes (preset)")
p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
p.add_argument("--tiny", action="store_true", help="tiny model, data, steps: all stages in under a minute (smoke test)")

# ---- data and token format: the oracle's 256 codes, token = code + 1, token 0 = BOS (never emitted) ------------------
MAX_SEGMENTS = 100  # ground-truth segments per image the reward reads (COCO has up to ~90; synthetic <= 8)


def load_coco(args, split):
    """annotations/panoptic_<split>.json, annotations/panoptic_<split>/*.png, <split>/ images -> items
    {id, file, png, size, segments, ann (held-out only: eval's gt.json)} and the categories; unreadable: skipped."""
    if not os.path.isdir(args.data_dir):
        raise UserError(f"--data_dir {args.data_dir}: no such directory")
    path = os.path.join(args.data_dir, "annotations", f"panoptic_{split}.json")
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing (expected the COCO layout annotations/panoptic_<split>.json)")
    try:
        with open(path) as f:
            d = json.load(f)
        cats = [dict(id=c["id"], name=c["name"], isthing=c["isthing"]) for c in d["categories"]]
        ims = {im["id"]: im for im in d["images"]}
        items = [dict(id=(im := ims[a["image_id"]])["id"], file=os.path.join(args.data_dir, split, im["file_name"]),
                      png=os.path.join(args.data_dir, "annotations", f"panoptic_{split}", a["file_name"]),
                      size=(im["width"], im["height"]), ann=a if split == args.val_split else None,
                      segments=[dict(id=s["id"], category_id=s["category_id"], iscrowd=s.get("iscrowd", 0))
                                for s in a["segments_info"]]) for a in d["annotations"]]
        known = {c["id"] for c in cats}  # and what eval's pq_compute reads: else it fails there, naming our gt.json
        bad = [f"segments with category_id {s['category_id']}, which is not in its categories" for it in items
               for s in it["segments"] if s["category_id"] not in known] + [f"segment {s}: needs an int id, a number "
               "area, iscrowd 0 or 1" for a in d["annotations"] for s in a["segments_info"] if type(s["id"]) is not int
               or type(s["area"]) not in (int, float) or s.get("iscrowd", 0) not in (0, 1)]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: malformed COCO panoptic json ({type(e).__name__}: {str(e)[:80]})")
    if bad:
        raise UserError(f"{path}: {bad[0]}")
    if missing := [it["png"] for it in items if not os.path.isfile(it["png"])]:
        raise UserError(f"{missing[0]}: missing panoptic PNG ({len(missing)} of {len(items)} missing)")
    return common.readable(items, split), cats


def load_data(args):
    """(train items, held-out items, categories); a synthetic item is a scene of common.synthetic_world."""
    if args.data == "synthetic":
        return [common.synthetic_world(split, n, args.image_size, args.seed)
                for split, n in [("train", args.num_train), ("val", args.num_val)]] + [common.CATEGORIES]
    (tr, cats), (va, val_cats) = (load_coco(args, s) for s in (args.train_split, args.val_split))
    if val_cats != cats:  # class k is the k-th category in both splits (and the oracle)
        raise UserError(f"--val_split {args.val_split}: its categories differ from --train_split {args.train_split}'s")
    return tr, va, cats


class Scenes(torch.utils.data.Dataset):
    """Items -> (index, image (3, S, S) in [-1, 1], oracle target: class and slot ids (2, S, S) (one-hot in vqvae),
    semantics, instances (S, S); reward's ground truth: segment index (S, S) 0..G, class per index (-1 none),
    crowd). Class k = the k-th category (0 void); crowd is void in the oracle's target; COCO is resized to S."""

    def __init__(self, items, categories, instances, size):
        self.items, self.I, self.size, self.categories = items, instances, size, categories
        self.index = {c["id"]: k + 1 for k, c in enumerate(categories)}  # category id -> class

    def __len__(self):
        return len(self.items)

    def scene(self, i):  # {image (S, S, 3) uint8, panoptic (S, S) ids, segments}
        it = self.items[i]
        if "file" not in it:
            return it
        img = np.array(common.open_rgb(it).resize((self.size,) * 2, Image.BILINEAR))
        try:  # ids, not an image: no rescaling of other modes (open_rgb's), the same one-line error
            with Image.open(it["png"]) as png:
                png = png.convert("RGB").resize((self.size,) * 2, Image.NEAREST)
        except OSError as e:  # common.readable checked the PNG's chunks, not its pixels
            raise UserError(f"{it['png']}: unreadable image ({type(e).__name__}: {str(e)[:80]})")
        return dict(image=img, panoptic=rgb2id(np.asarray(png)), segments=it["segments"])

    def __getitem__(self, i):
        s = self.scene(i)
        segs, G = [dict(x, category_id=self.index[x["category_id"]]) for x in s["segments"]], MAX_SEGMENTS + 1
        sem, inst = (torch.from_numpy(a) for a in vqvae.canonical(s["panoptic"], [x for x in segs if not x["iscrowd"]]))
        inst = inst.clamp(max=self.I - 1)  # more segments than slots: the last slot is shared
        target = torch.stack([sem, inst])  # not one-hot here: (C + I) x S x S floats are 245 MB per COCO image
        img = torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 127.5 - 1
        idx, cat, crowd = np.zeros(s["panoptic"].shape, np.int64), np.full(G, -1), np.zeros(G, bool)
        for j, x in enumerate(segs[:MAX_SEGMENTS]):
            idx[s["panoptic"] == x["id"]] = j + 1
            cat[j + 1], crowd[j + 1] = x["category_id"], x["iscrowd"] == 1
        return i, img, target, sem, inst, torch.from_numpy(idx), torch.from_numpy(cat), torch.from_numpy(crowd)


def segment(oracle, tokens, image, min_segment=0):
    """Tokens (N, 256) + images (N, 3, S, S) -> segment index per pixel (N, S, S) (0 = void) and each index's
    category (N, I) (-1 = none): the oracle's logits, then UViM's decoding (vqvae.to_panoptic)."""
    logits, C = vqvae.decode(oracle, tokens - 1, image), oracle.c["classes"]
    seg, cat = vqvae.to_panoptic(logits[:, :C], logits[:, C:])
    if min_segment > 0:  # small segments become void
        area = torch.stack([torch.bincount(x, minlength=cat.shape[1]) for x in seg.flatten(1)])  # (N, I) pixels
        cat = torch.where(area >= min_segment, cat, -1)
        seg = torch.where(cat.gather(1, seg.flatten(1)).view_as(seg) >= 0, seg, 0)
    return seg, cat


# ---- reward: PQ's counts per image, in memory and vectorized (no files, no Python loop over segments) ----------------
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


def reward_pq(pred, batch):
    """r = sum of IoUs of matched segments (same class, IoU > 0.5, void and crowd as PQ) - 0.3 x unmatched
    predicted segments. pred = (segment index (B, K, H, W), category (B, K, I)); batch: the ground truth
    gt (B, H, W), gt_cat (B, G+1), gt_crowd (B, G+1) -> r (B, K)."""
    (seg, cat), (B, K) = pred, pred[1].shape[:2]
    rep = lambda x: x.repeat_interleave(K, 0)  # noqa: E731
    c = pq_counts(*(rep(batch[k]) for k in ("gt", "gt_cat", "gt_crowd")), seg.flatten(0, 1), cat.flatten(0, 1))
    r = (c["iou"] - 0.3 * c["fp"]).view(B, K).float()
    return r, dict(tp=c["tp"].double().mean(), fp=c["fp"].double().mean(), fn=c["fn"].double().mean())


REWARDS = {"pq": reward_pq}


# ---- metric: COCO panoptic format, PQ as panopticapi computes it -----------------------------------------------------
VOID, OFFSET, GROUPS, SIZES = 0, 256 ** 3, ("All", "Things", "Stuff"), ("Things small", "Things large")  # SIZES: ours


def rgb2id(png):  # (H, W, 3) uint8 colours -> (H, W) segment ids: R + 256 G + 256^2 B (0 = void)
    return png.astype(np.uint32) @ np.array([1, 256, 256 ** 2], np.uint32)


def id2rgb(ids):  # (H, W) segment ids -> (H, W, 3) uint8 colours, the inverse of rgb2id
    return np.stack([np.asarray(ids, np.uint32) // d % 256 for d in (1, 256, 256 ** 2)], -1).astype(np.uint8)


def read_ids(path):
    try:
        with Image.open(path) as im:
            return rgb2id(np.asarray(im.convert("RGB")))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable panoptic PNG ({type(e).__name__})")


def pq_image(gt_ids, gt_segs, pred_ids, pred_segs, stats, split=None):
    """One image: add TP / FP / FN counts and matched IoUs to stats {category: [iou, tp, fp, fn]}; with an area
    `split`, to stats {(category, area >= split): ...}: the GT's area for TP and FN, the prediction's for FP.
    A pair matches if same category, GT not crowd and IoU > 0.5, where IoU = |p & g| / (|p| + |g| - |p & g|
    - |p & void|) with |g| the GT json's area. Unmatched non-crowd GT: FN. Unmatched prediction: FP unless
    more than half of it lies on void or on a crowd region of its category."""
    key = (lambda c, area: c) if split is None else (lambda c, area: (c, area >= split))
    pairs, counts = np.unique(gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64), return_counts=True)
    inter = {(int(k // OFFSET), int(k % OFFSET)): int(c) for k, c in zip(pairs, counts)}
    gt_matched, pred_matched = set(), set()
    for (g, q), n in inter.items():
        if g not in gt_segs or q not in pred_segs or gt_segs[g].get("iscrowd", 0) == 1 or \
                gt_segs[g]["category_id"] != pred_segs[q]["category_id"]:
            continue
        iou = n / (pred_segs[q]["area"] + gt_segs[g]["area"] - n - inter.get((VOID, q), 0))
        if iou > 0.5:
            s = stats.setdefault(key(gt_segs[g]["category_id"], gt_segs[g]["area"]), [0.0, 0, 0, 0])
            s[0], s[1] = s[0] + iou, s[1] + 1
            gt_matched.add(g)
            pred_matched.add(q)
    crowd = {}
    for g, seg in gt_segs.items():
        if g not in gt_matched and seg.get("iscrowd", 0) == 1:
            crowd[seg["category_id"]] = g  # one crowd region per category (panopticapi keeps the last)
        elif g not in gt_matched:
            stats.setdefault(key(seg["category_id"], seg["area"]), [0.0, 0, 0, 0])[3] += 1
    for q, seg in pred_segs.items():  # ignored: its pixels on void or on a crowd region of its category
        ignored = inter.get((VOID, q), 0) + inter.get((crowd.get(seg["category_id"]), q), 0)
        if q not in pred_matched and ignored / seg["area"] <= 0.5:
            stats.setdefault(key(seg["category_id"], seg["area"]), [0.0, 0, 0, 0])[2] += 1


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
        per_class[c] = r = dict(pq=iou / (tp + 0.5 * fp + 0.5 * fn), sq=iou / tp if tp else 0.0,
                                rq=tp / (tp + 0.5 * fp + 0.5 * fn))
        total["n"] += 1
        for k in ("pq", "sq", "rq"):
            total[k] += r[k]
    total.update({k: total[k] / total["n"] if total["n"] else 0.0 for k in ("pq", "sq", "rq")})
    return total, per_class


def pq_compute(gt_json_file, pred_json_file, gt_folder=None, pred_folder=None):
    """panopticapi's pq_compute: {"All" | "Things" | "Stuff": {pq, sq, rq, n}, "per_class": {category id:
    {pq, sq, rq}}}, values in [0, 1]. Folders default to the json paths without '.json'. Ours on top: "Things
    small" / "Things large" (split at the median area of the GT's things: a GT segment by its area, an unmatched
    prediction by its own), fp_per_image (unmatched, not ignored predictions) and split_area."""
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
        things = sorted(s["area"] for a in gt_json["annotations"] for s in a["segments_info"]
                        if categories[s["category_id"]].get("isthing") and not s.get("iscrowd"))
        split, stats = things[len(things) // 2] if things else 0, {}
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
            if missing := sorted(set(pred_segs) - set(ids.tolist())):
                raise UserError(f"{pred['file_name']}: segments {missing} are in the json and not in the PNG")
            gt_ids = read_ids(os.path.join(gt_folder, gt["file_name"]))
            if gt_ids.shape != pred_ids.shape:
                raise UserError(f"{pred['file_name']}: {pred_ids.shape} pixels, ground truth {gt_ids.shape}")
            pq_image(gt_ids, gt_segs, pred_ids, pred_segs, stats, split)
    except (KeyError, TypeError) as e:
        raise UserError(f"{gt_json_file} / {pred_json_file}: malformed COCO panoptic json (missing {e})")
    merged = {c: [sum(x) for x in zip(*(v for (d, _), v in stats.items() if d == c))] for c, _ in stats}  # summed back
    res = {g: pq_average(merged, categories, t)[0] for g, t in zip(GROUPS, (None, True, False))}
    for name, big in zip(SIZES, (False, True)):
        res[name] = pq_average({c: v for (c, b), v in stats.items() if b == big}, categories, True)[0]
    fp = sum(v[2] for v in stats.values()) / max(len(gt_json["annotations"]), 1)
    return dict(res, per_class=pq_average(merged, categories, None)[1], fp_per_image=fp, split_area=split)


# ---- eval: greedy codes -> segments; PQ in memory while training, through files (COCO panoptic format) at eval -------
@torch.no_grad()
def predict(model, oracle, ds, device, n_images, min_segment, micro_batch=0):  # 0: 50
    """Greedy segmentations of the first n_images -> [(segment index (S, S) uint32, {index: category id})].
    model None: the oracle's reconstruction of the ground truth (the ceiling of any code sequence)."""
    out, allowed = [], vqvae.allowed_tokens(oracle.c["codebook"], device)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(min(n_images, len(ds)))), micro_batch or 50)
    for idx, img, target, *_ in tqdm(loader, desc="eval", leave=False):  # rank 0 only
        img = img.to(device)
        if model is None:  # outside autocast: exactly the codes MLE trains on
            tok = vqvae.encode(oracle, target.to(device), img) + 1
        else:
            with common.autocast(device):
                tok = common.sample(model.eval(), img, 256, 1, 0, allowed=allowed)[0][:, 0]
        out += as_segments(*segment(oracle, tok, img, min_segment), ds.categories)
    if model is not None:
        model.train()
    return out


def as_segments(seg, cat, categories):
    """(N, S, S), (N, I) tensors of classes -> [(segment index (S, S) uint32, {index: category id})]. The pieces of
    a stuff class become one segment (its first index), as panopticapi's converter in UViM's eval: one sky, not two."""
    out = []
    for sg, ct in zip(seg.cpu().numpy(), cat.cpu().tolist()):
        first = np.array([ct.index(c) if c > 0 and not categories[c - 1]["isthing"] else q for q, c in enumerate(ct)])
        sg = first[sg].astype(np.uint32)
        out.append((sg, {q: categories[c - 1]["id"] for q, c in enumerate(ct)
                         if c > 0 and first[q] == q and (sg == q).any()}))
    return out


def pq_in_memory(preds, ds):
    """PQ (in %, pq_compute's structure) at the model's resolution: training's check (eval: pq_compute on files)."""
    stats, cats = {}, {c["id"]: c for c in ds.categories}
    for i, (sg, pc) in enumerate(preds):
        s = ds.scene(i)
        gt = {x["id"]: dict(x, area=int((s["panoptic"] == x["id"]).sum())) for x in s["segments"]}  # at this size
        pq_image(s["panoptic"].astype(np.uint32), gt, sg,
                 {q: dict(category_id=c, area=int((sg == q).sum())) for q, c in pc.items()}, stats)
    return {g: {k: v if k == "n" else 100 * v for k, v in pq_average(stats, cats, t)[0].items()}
            for g, t in zip(GROUPS, (None, True, False))}


def write_coco(folder, json_path, annotations, categories=None):
    """[(image_id, ids (H, W), [segments_info])] -> a COCO panoptic folder of PNGs + json."""
    os.makedirs(folder, exist_ok=True)
    for image_id, ids, _ in annotations:
        Image.fromarray(id2rgb(ids)).save(os.path.join(folder, f"{image_id}.png"))  # ids may be strings (Cityscapes)
    with open(json_path, "w") as f:
        json.dump(dict(categories=categories or [], annotations=[dict(
            image_id=i, file_name=f"{i}.png", segments_info=segs) for i, _, segs in annotations]), f)


# ---- stages ----------------------------------------------------------------------------------------------------------
def setup(args):
    rank, world, device = common.ddp_setup()
    torch.manual_seed(args.seed)
    path = args.oracle or os.path.join(args.out_dir, "vqvae_panoptic", "ckpt.pt")
    oracle = vqvae.load(path, "panoptic", device, None if args.oracle else args)  # of this run's flags?
    args.image_size = oracle.c["image_size"]
    tr, va, cats = load_data(args)
    if [c["id"] for c in cats] != [c["id"] for c in oracle.c["categories"]]:
        raise UserError(f"{path}: an oracle of other categories than this data's")
    tr, va = (Scenes(x, cats, oracle.c["instances"], args.image_size) for x in (tr, va))
    return rank, world, device, oracle, path, tr, va


def train_oracle(args):
    """--stage oracle: UViM's stage I (vqvae.train) on these scenes, with the oracle's preset (vqvae.PRESETS) and
    --oracle_flags. Loss: cross-entropy of each pixel's class and instance slot; report: PQ of its reconstructions."""
    oa = vqvae.oracle_args(args, "panoptic")
    if args.stage == "all" and vqvae.trained(oa):
        return
    common.ddp_setup()  # the loaders print on rank 0 only
    tr, va, cats = load_data(oa)
    tr, va = (Scenes(x, cats, oa.instances, oa.image_size) for x in (tr, va))
    C = len(cats) + 1  # semantic classes incl. void, then oa.instances slots

    def loss(logits, target, sem, inst, *_):  # logits (B, C + I, S, S), sem and inst (B, S, S)
        return F.cross_entropy(logits[:, :C], sem) + F.cross_entropy(logits[:, C:], inst)

    def report(oracle, batches):  # batches: (image, target, codes (B, 256)) of held-out scenes in order
        preds = [x for img, _, codes in batches for x in as_segments(*segment(oracle, codes + 1, img), cats)]
        res = pq_in_memory(preds, va)
        pq, things, stuff = (res[g]["pq"] for g in GROUPS)
        return res, f"scenes: PQ {pq:.1f} (things {things:.1f}, stuff {stuff:.1f})"

    vqvae.train(oa, tr, va, dict(out_chans=C + oa.instances, classes=C, categories=cats), loss, report)


def pretrain_encoder(args):
    """--stage encoder: the ViT alone learns every pixel's class on the synthetic training scenes."""
    if args.data != "synthetic":
        raise UserError("--stage encoder trains on the synthetic world; on COCO pass --init_encoder (a timm ViT)")
    rank, world, device, _, _, tr, _ = setup(args)
    cfg = common.model_config(args.model, args.image_size, 1, 1, 0, 0, args.patch)  # only its ViT part is used
    common.pretrain_encoder(args, "panoptic", cfg, tr.items, device, rank, world)


def train(args, stage):
    """mle / mle_cont / reward: one loop, the step differs. MLE: teacher-forced CE on the oracle's codes of the
    ground truth. Reward: sample K code sequences, decode to segments, PQ reward, REINFORCE (leave-one-out)."""
    init = args.init or (os.path.join(args.out_dir, "panoptic", "mle", "ckpt.pt") if stage != "mle" else "")
    ck = common.load_ckpt(init, "panoptic") if init else None
    rank, world, device, oracle, oracle_path, tr, va = setup(args)
    V, L, master = oracle.c["codebook"] + 1, 256, rank == 0
    meta = dict(oracle=oracle_path, oracle_id=oracle.fingerprint, reward=args.reward)
    if ck:  # prior: training steps behind the starting point
        meta = dict(ck["meta"], prior=ck["meta"].get("prior", 0) + ck["step"])
        cfg, state = ck["config"], ck["model"]
    else:
        cfg, state = common.model_config(args.model, args.image_size, V, L, 0, args.dec_layers, args.patch), None
    raw, model, opt, start, path, meta = common.stage_setup("panoptic", stage, args, cfg, meta, device, world, state)
    vqvae.check_lm(raw.cfg, meta, oracle, path if start else init)  # its codes must mean what this oracle's do
    if not ck and start == 0:
        common.init_encoder(raw, args, "panoptic")
    allowed = vqvae.allowed_tokens(V - 1, device)
    log = common.Logger(os.path.dirname(path), master, resume=start)
    common.print0(f"{stage}: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params, {len(tr)} train images, "
                  f"{V - 1} codes, steps {start}->{args.steps}, global batch {args.batch_size} on {world} process(es)")
    sampler = common.StepSampler(len(tr), args.batch_size, args.seed, start, args.steps, rank, world)
    loader = torch.utils.data.DataLoader(tr, batch_sampler=sampler, num_workers=args.workers)
    b, K, t0 = args.batch_size // world, args.samples, time.time()
    mb = args.micro_batch or b
    for step, (idx, img, target, _, _, gt, gt_cat, gt_crowd) in enumerate(tqdm(
            loader, disable=not master, initial=start, total=args.steps, desc=stage), start):
        common.set_lr(opt, step, args.lr, args.warmup, args.steps, args.schedule)
        pos = torch.arange(rank * b, (rank + 1) * b)  # global position of each example in the batch
        img, target = img.to(device), target.to(device)

        def mle_micro(s):
            tok = vqvae.encode(oracle, target[s], img[s]) + 1  # (b, 256)
            with common.autocast(device):
                loss, _, st = common.mle_loss(model, img[s], tok, torch.ones_like(tok, dtype=torch.float), allowed)
            return loss, st

        def reward_micro(s):
            noise = common.example_noise(args.seed, step, pos[s], K, L)
            with common.autocast(device):
                tok, _ = common.sample(raw, img[s], L, K, args.temperature, noise=noise, allowed=allowed)
            seg, cat = segment(oracle, tok.flatten(0, 1), img[s].repeat_interleave(K, 0), args.min_segment)
            batch = dict(gt=gt[s].to(device), gt_cat=gt_cat[s].to(device), gt_crowd=gt_crowd[s].to(device))
            r, aux = REWARDS[args.reward]((seg.view(-1, K, *seg.shape[1:]), cat.view(-1, K, cat.shape[1])), batch)
            with common.autocast(device):
                loss, _, _, _, st = common.reinforce_loss(model, img[s], tok, r, torch.ones_like(tok, dtype=torch.bool),
                                                          args.baseline, args.grad_on, allowed)
            return loss, dict(aux, **st, reward=r.mean())  # a user's aux cannot overwrite (or clash with) these

        micro = reward_micro if stage == "reward" else mle_micro
        stats = common.train_step(model, opt, args, [lambda s=slice(i, i + mb): micro(s) for i in range(0, b, mb)],
                                  world)
        if args.stop_at and step + 1 >= args.stop_at:
            common.print0(f"stopping after step {step + 1} without saving (--stop_at)")
            raise SystemExit(0)  # a preempted job: no later stage runs either
        done = step + 1 == args.steps
        if (step + 1) % args.log_every == 0 or done:
            log(step + 1, lr=opt.param_groups[0]["lr"] / opt.param_groups[0]["lr_mult"],
                s_per_step=(time.time() - t0) / (step + 1 - start), **stats)
        if master and ((step + 1) % args.ckpt_every == 0 or done):
            common.save_stage(path, "panoptic", raw, opt, step + 1, args, meta)
        if master and ((args.eval_every and (step + 1) % args.eval_every == 0) or done):
            res = pq_in_memory(predict(raw, oracle, va, device, args.eval_images, args.min_segment,
                                       args.micro_batch), va)
            log(step + 1, **{f"val_{g}_{k}": v for g, d in res.items() for k, v in d.items()})
    log(args.steps, quiet=True, replica_checksums=common.replica_checksums(raw))  # DDP kept ranks in sync?
    common.ddp_end_stage()


def class_colours(categories):
    """Category id -> RGB: things bright at evenly spaced hues, stuff dull at the hues between; every column alike."""
    groups = [[c for c in categories if bool(c.get("isthing")) == t] for t in (True, False)]
    return {c["id"]: Image.new("HSV", (1, 1), (int(255 * (i + off) / len(g)), sat, val)).convert("RGB").getpixel((0, 0))
            for g, (sat, val, off) in zip(groups, ((220, 240, 0), (110, 150, 0.5))) for i, c in enumerate(g)}


def picture(ids, cats, colours):
    """Each segment its category's colour x 0.7..1.3 (instances as shades), thin dark boundaries, void black."""
    col, d = np.zeros(ids.shape + (3,), np.float32), ids.astype(np.int64)
    for q, c in cats.items():
        col[ids == q] = np.array(colours[c]) * (0.7 + 0.6 * ((q * 0.618) % 1))
    col[np.pad(np.diff(d, axis=0) != 0, ((1, 0), (0, 0))) | np.pad(np.diff(d, axis=1) != 0, ((0, 0), (1, 0)))] *= 0.3
    return Image.fromarray(col.clip(0, 255).astype(np.uint8))


def add_legend(path, categories, colours):  # a row below the grid at path: each category's colour and name
    grid = Image.open(path).convert("RGB")
    out, w, y = ImageOps.expand(grid, (0, 0, 0, 20), "white"), grid.width // len(categories), grid.height + 4
    for i, c in enumerate(categories):
        ImageDraw.Draw(out).rectangle([i * w + 4, y, i * w + 16, y + 12], colours[c["id"]])
        ImageDraw.Draw(out).text((i * w + 20, y), c["name"], fill="black")
    out.save(path)


def evaluate(args):
    """Every checkpoint that exists, side by side: predictions and ground truth in COCO panoptic format
    (PNG folders + json), PQ by pq_compute over those files, metrics.json, table.md, a grid."""
    base = os.path.join(args.out_dir, "panoptic")
    cks = common.eval_checkpoints(args.out_dir, "panoptic")  # {name: (path, ckpt)}: mle and its two tunings
    rank, world, device, oracle, _, tr, va = setup(args)
    for path, ck in cks.values():
        vqvae.check_lm(ck["config"], ck["meta"], oracle, path)
    common.ddp_end_stage()  # no collective below: rank 0 evaluates alone
    if rank:
        return
    out, n = os.path.join(base, "eval"), min(args.eval_images, len(va))
    items, gt_json = va.items[:n], os.path.join(out, "gt.json")
    image_ids = [it.get("id", i) for i, it in enumerate(items)]
    if "file" in items[0]:  # COCO: the original PNGs and the evaluated images' annotations
        gt_folder = os.path.join(args.data_dir, "annotations", f"panoptic_{args.val_split}")
        os.makedirs(out, exist_ok=True)
        with open(gt_json, "w") as f:
            json.dump(dict(categories=va.categories, annotations=[it["ann"] for it in items]), f)
    else:
        gt_folder = os.path.join(out, "gt")
        write_coco(gt_folder, gt_json, [(i, it["panoptic"].astype(np.uint32), it["segments"])
                                        for i, it in zip(image_ids, items)], va.categories)
    preds, rows = {}, {}  # one model at a time, its first 8 kept for the grid (5000 COCO maps at 512 px: ~5 GB)
    for name in ["oracle", *cks]:
        path, ck = cks.get(name, (None, None))  # the oracle row: its reconstruction of the ground truth
        model = common.build_model(ck["config"], device, ck["model"], path, args.image_size) if ck else None
        pr = predict(model, oracle, va, device, n, args.min_segment, args.micro_batch)
        pj = os.path.join(out, f"pred_{name}.json")
        full = [sg if "size" not in it else  # back to the original resolution
                np.asarray(Image.fromarray(sg.astype(np.int32)).resize(it["size"], Image.NEAREST)).astype(np.uint32)
                for it, (sg, _) in zip(items, pr)]
        write_coco(os.path.join(out, f"pred_{name}"), pj, [(i, sg, [dict(id=q, category_id=c) for q, c in cats.items()
                                                               if (sg == q).any()])  # resizing may drop a tiny one
                                                          for i, sg, (_, cats) in zip(image_ids, full, pr)])
        res = pq_compute(gt_json, pj, gt_folder, os.path.join(out, f"pred_{name}"))
        prior = ck["meta"].get("prior", 0) if ck else 0  # steps e.g. "1500+300"
        rows[name] = dict({g: {k: v if k == "n" else 100 * v for k, v in res[g].items()} for g in GROUPS + SIZES},
                          steps="-" if ck is None else f"{prior}+{ck['step']}" if prior else str(ck["step"]),
                          segments=float(np.mean([len(c) for _, c in pr])), fp_per_image=res["fp_per_image"])
        preds[name] = pr[:8]
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(rows, f, indent=1)
    cols = [("PQ", "All", "pq"), ("SQ", "All", "sq"), ("RQ", "All", "rq"), ("PQ things", "Things", "pq"), ("PQ small "
             "things", SIZES[0], "pq"), ("PQ large things", SIZES[1], "pq"), ("PQ stuff", "Stuff", "pq")]
    table = [" | ".join(["| model | steps"] + [h for h, _, _ in cols] + ["segments/img | FP segments/img |"]),
             "|---" * 11 + "|"]
    table += [" | ".join([f"| {k} | {r['steps']}"] + [f"{r[g][m]:.1f}" for _, g, m in cols]
                         + [f"{r['segments']:.2f} | {r['fp_per_image']:.2f} |"]) for k, r in rows.items()]
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"held-out {n} images, greedy codes; small / large things: area below / at least the median thing "
                f"area of the ground truth ({res['split_area']} pixels)\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))
    colours = class_colours(va.categories)
    grid = [[Image.fromarray(s["image"]), picture(s["panoptic"], {g["id"]: g["category_id"] for g in s["segments"]},
                                                  colours)] + [picture(*preds[k][i], colours) for k in cks]
            for i, s in enumerate(va.scene(i) for i in range(min(8, n)))]  # at the model's resolution
    common.save_grid(grid, ["image", "ground truth"] + list(cks), os.path.join(out, "grid.png"))
    add_legend(os.path.join(out, "grid.png"), va.categories, colours)
    print(f"wrote {out}/metrics.json, table.md, gt.json + gt/, pred_<model>.json + pred_<model>/, grid.png")


def main():
    args = p.parse_args()
    preset = dict(PRESETS[args.data], **(TINY if args.tiny else {}))
    if (args.data == "coco") != bool(args.data_dir):  # --data_dir alone would silently train on the synthetic world
        raise UserError("--data coco needs --data_dir, and --data_dir needs --data coco")
    for k in ["model", "patch", "dec_layers", "batch_size", "samples", "enc_lr_mult", "eval_images", "num_train",
              "num_val", "temperature"]:
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    stages = ["oracle", "encoder", "mle", "reward", "mle_cont", "eval"] if args.stage == "all" else [args.stage]
    if args.stage == "all" and args.oracle:  # stage I is that checkpoint
        stages.remove("oracle")
    if args.stage == "all" and (args.data != "synthetic" or args.init_encoder):  # a pretrained ViT instead
        stages.remove("encoder")
    given = dict(steps=args.steps, lr=args.lr, warmup=args.warmup, wd=args.wd)
    for stage in stages:
        common.stage_flags(args, preset, stage, given, "panoptic", REWARDS)  # mle_cont: the reward stage's lr, steps
        if stage == "oracle":  # its own flags: vqvae.py's preset and --oracle_flags (checks above: before stage I)
            train_oracle(args)
        elif stage == "eval":
            evaluate(args)
        elif stage == "encoder":
            pretrain_encoder(args)
        else:
            train(args, stage)
            args.init = ""  # --init starts the first stage; reward and mle_cont then start from this run's mle


if __name__ == "__main__":
    common.run(main)
