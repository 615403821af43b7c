"""Object detection tuned with a task reward (paper section 4.2, Table 2, Table 6).

A Pix2seq-style model writes the boxes of an image as a token sequence. Stage 1 (MLE) imitates
the ground truth; stage 2 (REINFORCE) samples box sets from the model and raises the likelihood
of those that score above a baseline on the authors' reward: class-weighted matches averaged
over IoU thresholds 0.50:0.05:0.95 minus 0.3 x duplicates, plus a loss that teaches each box's
confidence token its IoU, which ranks the boxes for mAP (with p(class) and p(coordinates): box_score).

    python detect.py                    # all stages on the synthetic world (2 CPU cores: 20 min)
    python detect.py --tiny             # every stage in about a minute (smoke test)
    python detect.py --stage encoder|mle|reward|mle_cont|eval
    torchrun --nproc_per_node=8 detect.py --stage reward --data coco --data_dir /data/coco

Measured on the synthetic world with an annotator that misses 30% of the objects (README, results/detect/; 19 min
16 s on 2 CPU cores): against the annotations MLE 9.2 AP / 15.3 AR@100, MLE continued 8.7 / 15.2, reward-tuned
14.5 / 29.0 (against the truth 11.9 / 15.0 -> 20.4 / 29.2); paper, COCO: 39.2 -> 54.3 mAP, 54.4 -> 67.2 AR@100.
"""
import argparse
import contextlib
import io
import json
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import common
from common import UserError

# ---- config: one flat block; presets per data source, explicit flags override ----------------------------------------
PRESETS = {
    "synthetic": dict(model="tiny", patch=8, dec_layers=4, image_size=64, max_boxes=8, batch_size=32,
                      mle_steps=2000, mle_lr=1e-3, mle_warmup=100, mle_wd=0.05, reward_steps=300, reward_lr=1e-5,
                      reward_warmup=50, reward_wd=0.0, samples=4, eval_images=500, num_train=10000, num_val=500,
                      enc_steps=1000, enc_lr=1e-3, enc_warmup=100, enc_wd=0.05, missed=0.3, box_noise=0.0),
    # the paper's COCO finetune (Table 6); its Objects365 pretraining is out of scope: use --init
    "coco": dict(model="B/16", patch=16, dec_layers=6, image_size=1280, max_boxes=100, batch_size=256,
                 mle_steps=10000, mle_lr=1e-4, mle_warmup=1000, mle_wd=0.0, reward_steps=100000, reward_lr=1e-6,
                 reward_warmup=1000, reward_wd=0.0, samples=2, eval_images=5000, num_train=0, num_val=0,
                 missed=0.0, box_noise=0.0),
}
TINY = dict(model="tiny", patch=8, dec_layers=2, image_size=32, max_boxes=8, batch_size=8, mle_steps=30,
            reward_steps=10, eval_images=16, num_train=128, num_val=16, mle_warmup=5, reward_warmup=2, enc_steps=10,
            enc_warmup=2)
# --tiny with any --data: the tiny model and resolution too (on COCO the preset's B/16 at 1280 px is 6 s a step)

p = argparse.ArgumentParser(description=__doc__, formatter_class=common.Help)
p.add_argument("--stage", default="all", choices=["encoder", "mle", "reward", "mle_cont", "eval", "all"],
               help="encoder: pretrain the ViT on the synthetic world's pixel classes (our stand-in for a pretrained "
                    "ViT); mle: pretrain; reward: tune from out/detect/mle; mle_cont: the fair control, MLE from the "
                    "same start at the reward stage's lr, warmup, schedule and steps (read from its checkpoint); eval: "
                    "every checkpoint side by side; all: each in turn")
p.add_argument("--data", default="synthetic", choices=["synthetic", "coco"], help="data source, picks the preset")
p.add_argument("--data_dir", default="", help="COCO root: annotations/instances_<split>.json and <split>/ images")
p.add_argument("--train_split", default="train2017", help="COCO training split name")
p.add_argument("--val_split", default="val2017", help="COCO held-out split name")
p.add_argument("--max_things", type=int, default=None, help="synthetic world: most objects in a scene (preset: 6)")
p.add_argument("--missed", type=float, default=None, help="synthetic annotator: each object left unannotated with "
               "this probability, in both splits, as COCO's annotators miss objects (preset); the truth keeps them")
p.add_argument("--box_noise", type=float, default=None,
               help="synthetic annotator: each annotated box edge moves by N(0, this x the box's size) (preset: 0)")
p.add_argument("--radius", type=float, nargs=2, default=None,
               help="synthetic world: object radius range, x image size (0.1 0.25; preset)")
p.add_argument("--out_dir", default="out", help="stages write out_dir/detect/<stage>/")
p.add_argument("--model", default=None, help="ViT size: tiny, S/16, B/16, L/16 (preset)")
p.add_argument("--patch", type=int, default=None, help="patch size when --model has none (tiny; preset)")
p.add_argument("--dec_layers", type=int, default=None, help="decoder depth (paper: 6; preset)")
p.add_argument("--init_encoder", default="", help="mle stage's ViT weights: timm naming or encoder.pt (default: "
               "out_dir/detect/encoder/encoder.pt of --stage encoder, if it exists)")
p.add_argument("--image_size", type=int, default=None, help="square input resolution (paper: 1280; preset)")
p.add_argument("--max_boxes", type=int, default=None, help="box slots per sequence, 6 tokens each (COCO: 100; preset)")
p.add_argument("--batch_size", type=int, default=None, help="global batch, split over processes (preset)")
p.add_argument("--micro_batch", type=int, default=0, help="per-process micro-batch: training, eval (0: whole / 128)")
p.add_argument("--steps", type=int, default=None, help="steps of this stage (preset; mle_cont: the reward stage's)")
p.add_argument("--lr", type=float, default=None, help="peak learning rate of this stage (preset)")
p.add_argument("--warmup", type=int, default=None, help="linear warmup steps of this stage (preset)")
p.add_argument("--wd", type=float, default=None, help="decoupled weight decay of this stage (preset)")
p.add_argument("--enc_lr_mult", type=float, default=1.0, help="encoder learning rate = lr x this")
p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"], help="optimizer (encoder stage: adamw)")
p.add_argument("--clip", type=float, default=1.0, help="gradient clipping by global norm (0: off)")
p.add_argument("--samples", type=int, default=None, help="samples per image in the reward stage (K; preset)")
p.add_argument("--baseline", default="loo", choices=["none", "independent", "loo"],
               help="reward baseline: none, another sample's reward (paper Alg. 2), mean of the other K-1")
p.add_argument("--grad_on", default="first", choices=["first", "all"], help="train on sample 0 only or all K")
p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature in the reward stage")
p.add_argument("--reward", default="map", help="reward to optimize, a key of REWARDS: map (the paper's) or recall, "
               "whose stage writes <out_dir>/detect/reward_recall/, so eval shows it beside map's")
p.add_argument("--conf_weight", type=float, default=0.3, help="weight of the confidence-to-IoU loss")
p.add_argument("--init", default="", help="checkpoint the (first) stage starts from (default: the previous stage's)")
p.add_argument("--resume", action="store_true", help="continue this stage from its own last checkpoint")
p.add_argument("--stop_at", type=int, default=0, help="exit unsaved after this mle/reward/mle_cont step (preempted)")
p.add_argument("--compile", action="store_true", help="torch.compile the training forward (not the encoder stage)")
p.add_argument("--seed", type=int, default=0, help="seed of init, data order and sampling noise")
p.add_argument("--log_every", type=int, default=50, help="print a line every this many steps")
p.add_argument("--eval_every", type=int, default=0, help="held-out mAP every this many steps (0: at the end)")
p.add_argument("--ckpt_every", type=int, default=500, help="checkpoint every this many steps")
p.add_argument("--eval_images", type=int, default=None, help="held-out images to evaluate (preset)")
p.add_argument("--num_train", type=int, default=None, help="synthetic training scenes (preset)")
p.add_argument("--num_val", type=int, default=None, help="synthetic held-out scenes (preset)")
p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (COCO)")
p.add_argument("--tiny", action="store_true", help="tiny model, data, steps: all stages in under a minute (smoke test)")

# ---- data and token format: per box [ymin, xmin, ymax, xmax, class, conf] --------------------------------------------
# tokens 0..2 confidence (0 = padding box = end), 3..1003 coordinate levels, then classes, then BOS

CONF0, COORD0, LEVELS, CLS0 = 0, 3, 1000, 1004


def encode(boxes, labels, max_boxes, gen=None):
    """boxes (n, 4) yxyx in [0, 1], labels (n,) -> tokens (max_boxes * 6,); gen shuffles (MLE)."""
    order = torch.randperm(len(boxes), generator=gen) if gen is not None else torch.arange(len(boxes))
    order = order[:max_boxes]
    t = torch.zeros(max_boxes, 6, dtype=torch.long)  # padding boxes are all token 0
    t[:len(order), :4] = COORD0 + (boxes[order] * LEVELS).round().long().clamp(0, LEVELS)
    t[:len(order), 4] = CLS0 + labels[order]
    t[:len(order), 5] = 2  # ground truth is confident
    return t.flatten()


def decode(tokens, num_classes):
    """(..., L) -> boxes (..., P, 4) yxyx in [0, 1] (corners sorted), labels (..., P), valid (..., P)."""
    t = tokens.view(*tokens.shape[:-1], -1, 6)
    c = (t[..., :4] - COORD0).clamp(0, LEVELS).float() / LEVELS
    boxes = torch.stack([torch.minimum(c[..., 0], c[..., 2]), torch.minimum(c[..., 1], c[..., 3]),
                         torch.maximum(c[..., 0], c[..., 2]), torch.maximum(c[..., 1], c[..., 3])], -1)
    return boxes, (t[..., 4] - CLS0).clamp(0, num_classes - 1), t[..., 5] > 0


def grammar(max_boxes, num_classes, conf=(1, 2)):
    """allowed (L, V): slot 0 a coordinate or the end token, slots 1-3 coordinates, slot 4 a class,
    slot 5 a confidence in conf. Training reads the confidence as a distribution over {1, 2}; when
    sampling, conf=(2,) writes the constant 2 ("a box", as in the ground truth): a sampled 1 fed
    back as context would be a token the MLE model never saw after a box, and derails the rest
    of the sequence (we saw tuning collapse that way). Coordinates and classes are the same."""
    a = torch.zeros(6, CLS0 + num_classes + 1, dtype=torch.bool)
    a[:4, COORD0:COORD0 + LEVELS + 1] = True
    a[0, CONF0] = True
    a[4, CLS0:CLS0 + num_classes] = True
    a[5, list(conf)] = True
    return a.repeat(max_boxes, 1)


def annotate(things, rng, missed, box_noise, size):
    """The synthetic annotator, as COCO's miss objects (Pix2seq: the cause of a conservative MLE model): each object
    is left out with probability `missed`, each kept box's x / y edges move by N(0, box_noise x its width / height).
    -> [(box [x0, y0, x1, y1] pixels, label, area)] of the annotated objects."""
    out = []
    for t in things:
        keep, e = rng.random() >= missed, rng.normal(0, box_noise, 4)  # drawn for every object: P changes no noise
        if keep:
            (x0, y0, x1, y1), w, h = t["box"].tolist(), t["box"][2] - t["box"][0], t["box"][3] - t["box"][1]
            x0, x1 = sorted(np.clip([x0 + e[0] * w, x1 + e[2] * w], 0, size).tolist())
            y0, y1 = sorted(np.clip([y0 + e[1] * h, y1 + e[3] * h], 0, size).tolist())
            out.append((np.array([x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)], np.float32), t["label"], t["area"]))
    return out


def load_synthetic(split, n, size, seed, missed=0.0, box_noise=0.0, **scene):
    """-> items (boxes / labels: the annotations, what training and the reward see; true_boxes / true_labels: every
    object, exact), the annotations' GT dict and the truth's (for COCOeval)."""
    scenes = common.synthetic_world(split, n, size, seed, **scene)
    cats = [dict(id=i + 1, name=c) for i, c in enumerate(common.THINGS)]
    items, gt, truth = [], dict(images=[], annotations=[], categories=cats), dict(images=[], annotations=[],
                                                                                  categories=cats)
    for i, s in enumerate(scenes):
        rng = np.random.default_rng([seed, {"train": 1, "val": 2}[split], i, 17])  # fixed per scene and seed
        true = [(t["box"], t["label"], t["area"]) for t in s["things"]]
        it = dict(id=i, image=s["image"], w=size, h=size)
        for d, key, objs in [(gt, "", annotate(s["things"], rng, missed, box_noise, size)), (truth, "true_", true)]:
            b = np.array([o[0] for o in objs], np.float32).reshape(-1, 4)
            it[key + "boxes"], it[key + "labels"] = b[:, [1, 0, 3, 2]] / size, [o[1] for o in objs]
            d["images"].append(dict(id=i, width=size, height=size))
            d["annotations"] += [dict(id=len(d["annotations"]) + j + 1, image_id=i, category_id=int(lab) + 1,
                                      bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)], area=area,
                                      iscrowd=0) for j, ((x0, y0, x1, y1), lab, area) in enumerate(objs)]
        items.append(it)
    return items, gt, truth


def load_coco(data_dir, split):
    """instances_<split>.json -> items (boxes yxyx in [0, 1] of the original image, crowd left out of
    training targets but kept in the GT json for COCOeval) and the GT dict."""
    path = os.path.join(data_dir, "annotations", f"instances_{split}.json")
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir}: no such directory")
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing (expected the COCO layout annotations/instances_<split>.json)")
    try:
        with open(path) as f:
            gt = json.load(f)
        cats, names = sorted(c["id"] for c in gt["categories"]), [c["name"] for c in sorted(
            gt["categories"], key=lambda c: c["id"])]
        label = {c: i for i, c in enumerate(cats)}  # category id -> class index (a dict: COCO has ~860k annotations)
        items = {im["id"]: dict(id=im["id"], file=os.path.join(data_dir, split, im["file_name"]), w=im["width"],
                                h=im["height"], size=(im["width"], im["height"]), labels=[], boxes=[])
                 for im in gt["images"]}
        if len(items) < len(gt["images"]):
            raise UserError(f"{path}: {len(gt['images']) - len(items)} images repeat another image's id")
        for k, a in enumerate(gt["annotations"]):  # name the field: filtered subsets keep stray annotations
            box = len(a["bbox"]) == 4 and min(a["bbox"][2:]) >= 0 and np.isfinite(a["bbox"]).all()  # NaN: not >= 0
            if bad := [n for n, ok in [("image_id", a["image_id"] in items), ("category_id", a["category_id"] in label),
                                       ("bbox", box), ("iscrowd", a.get("iscrowd", 0) in (0, 1))] if not ok]:
                raise UserError(f"{path}: annotation {k}: {bad[0]} {a[bad[0]]!r} (not in the file / not [x, y, w, h] "
                                "/ not 0 or 1)")
        # COCOeval keys ground truth by annotation id (merged exports repeat them) and reads iscrowd and area
        gt["annotations"] = [dict(a, id=k + 1, iscrowd=a.get("iscrowd", 0), area=a.get("area", w * h))
                             for k, a in enumerate(gt["annotations"]) for w, h in [a["bbox"][2:4]]]
        for a in gt["annotations"]:
            if a.get("iscrowd", 0):
                continue
            it, (x, y, w, h) = items[a["image_id"]], a["bbox"]
            it["labels"].append(label[a["category_id"]])
            it["boxes"].append([y / it["h"], x / it["w"], (y + h) / it["h"], (x + w) / it["w"]])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError, ZeroDivisionError) as e:
        raise UserError(f"{path}: malformed COCO instances file ({type(e).__name__}: {str(e)[:80]})")
    for it in items.values():  # clipped to the image; a box with nothing inside it is no target
        b = np.clip(np.array(it["boxes"], np.float32).reshape(-1, 4), 0, 1)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        it["boxes"], it["labels"] = b[keep], [c for c, k in zip(it["labels"], keep) if k]
    return list(items.values()), gt, names, cats


class Boxes(torch.utils.data.Dataset):
    """Items -> (index, image in [-1, 1] (3, S, S), boxes, labels); unreadable images are skipped."""

    def __init__(self, items, size):
        self.items, self.size = items, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        it = self.items[i]
        img = np.asarray(common.open_rgb(it).resize((self.size, self.size), Image.BILINEAR), np.float32)
        return i, torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1, torch.from_numpy(it["boxes"]), \
            torch.tensor(it["labels"], dtype=torch.long)


def scene_flags(args):
    return {k: v for k, v in [("max_things", args.max_things), ("radius", args.radius and tuple(args.radius))]
            if v is not None}


def load_data(args):
    """-> train items, val items, val GT dicts {"annotations": ..., "truth": ... (synthetic only)}, class names,
    COCO category ids."""
    if args.data == "synthetic":
        flags = dict(scene_flags(args), missed=args.missed, box_noise=args.box_noise)
        tr = load_synthetic("train", args.num_train, args.image_size, args.seed, **flags)[0]
        va, gt, truth = load_synthetic("val", args.num_val, args.image_size, args.seed, **flags)
        return tr, va, dict(annotations=gt, truth=truth), list(common.THINGS), list(range(1, len(common.THINGS) + 1))
    tr, _, names, cats = load_coco(args.data_dir, args.train_split)
    va, gt, _, val_cats = load_coco(args.data_dir, args.val_split)
    if val_cats != cats:  # a class is an index into the sorted category ids: both splits must list the same
        raise UserError(f"--val_split {args.val_split}: categories {val_cats[:8]}... differ from --train_split's")
    return common.readable(tr, args.train_split), common.readable(va, args.val_split), dict(annotations=gt), names, \
        cats


def collate(batch):
    idx, imgs, boxes, labels = zip(*batch)
    return torch.tensor(idx), torch.stack(imgs), list(boxes), list(labels)


def gt_arrays(boxes, labels, max_boxes):  # lists -> padded gt_boxes (B, M, 4), gt_labels (B, M) (-1: no box)
    gb, gl = torch.zeros(len(boxes), max_boxes, 4), torch.full((len(boxes), max_boxes), -1)
    for i, (b, l) in enumerate(zip(boxes, labels)):
        gb[i, :len(b[:max_boxes])], gl[i, :len(l[:max_boxes])] = b[:max_boxes], l[:max_boxes]
    return gb, gl


def class_weights(items, num_classes, smooth=0.05):
    """w_c proportional to 1 / (count_c + smooth * total), mean 1 (the authors' reward)."""
    counts = np.bincount(np.concatenate([np.array(it["labels"], int) for it in items]), minlength=num_classes)
    if counts.sum() == 0:  # else NaN weights, then a misleading "non-finite ... lower --lr"
        raise UserError("the training split has no (non-crowd) boxes: nothing to learn")
    w = 1.0 / (counts + smooth * counts.sum())
    return (w * num_classes / w.sum()).tolist()


# ---- rewards: reward(pred (B, K, L), batch) -> (r (B, K), aux) -------------------------------------------------------
def box_iou(a, b):  # (..., P, 4), (..., G, 4) yxyx -> (..., P, G)
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a)[..., :, None] + area(b)[..., None, :] - inter).clamp(min=1e-9)


def match(pred, batch, thr, weights):
    """Greedy matching of one IoU threshold, as the authors' code: a (pred, gt) pair counts if same
    class and IoU > thr; each prediction keeps its best GT; each GT is won by its best prediction.
    Returns class-weighted matched GT (B, K), weighted duplicates (B, K), IoU of each pred (B, K, P)."""
    pb, pl, pv = decode(pred, len(weights))
    gb, gl = batch["gt_boxes"][:, None], batch["gt_labels"][:, None]  # (B, 1, G, 4): broadcast over samples
    # IoU on the integer grid of coordinate levels, in float64: exact, so IoU == thr is decidable
    iou = box_iou((pb.double() * LEVELS).round(), (gb.double() * LEVELS).round())
    ok = (iou > thr) & pv[..., :, None] & (gl >= 0)[..., None, :] & (pl[..., :, None] == gl[..., None, :])
    iou = iou * ok
    iou = iou * torch.nn.functional.one_hot(iou.argmax(-1), iou.shape[-1]).bool()  # one GT per prediction
    win = torch.nn.functional.one_hot(iou.argmax(-2), iou.shape[-2]).transpose(-1, -2).bool()  # (B, K, P, G)
    matched = iou.amax(-2) > 0  # (B, K, G)
    dup = ((iou > 0) & ~win).any(-1)  # (B, K, P): would have matched, but its GT was taken
    w = torch.as_tensor(weights, device=pred.device)
    return (matched * w[gl.clamp(min=0)]).sum(-1), (dup * w[pl]).sum(-1), iou.sum(-1).float()


def reward_map(pred, batch, dup_weight=0.3):
    """The authors' mAP reward: r = mean over thr in 0.50:0.05:0.95 of
    [sum_{matched GT g} w_class(g) - 0.3 * sum_{duplicate p} w_class(p)], w_c = 1/(n_c + 0.05 N), mean 1.
    Their code keys thresholds by one decimal, which silently re-weights them; we use the uniform
    mean they meant."""
    r = 0.0
    for thr in np.linspace(0.5, 0.95, 10).round(2).tolist():  # exact 0.65 (float32 linspace: 0.6499999762)
        m, d, _ = match(pred, batch, thr, batch["class_weights"])
        r = r + (m - dup_weight * d) / 10
    return r, {}


def reward_recall(pred, batch, dup_weight=0.3):
    """Recall reward: r = #GT matched at IoU > 0.5 - 0.3 * #duplicates (unweighted)."""
    m, d, _ = match(pred, batch, 0.5, [1.0] * len(batch["class_weights"]))
    return m - dup_weight * d, {}


REWARDS = {"map": reward_map, "recall": reward_recall}


def conf_loss(logits, tokens, match_iou, num_classes):
    """Confidence supervision: slot 5 of every sampled box learns (P1, P2) = (1 - IoU, IoU) of its
    match, so at eval P2 is the expected IoU. logits (N, L, V), tokens (N, L), match_iou (N, P)."""
    lp = logits[:, 5::6].float().log_softmax(-1)  # (N, P, V); masked to tokens 1 and 2
    valid = decode(tokens, num_classes)[2]
    ce = -((1 - match_iou) * lp[..., 1] + match_iou * lp[..., 2])
    return (ce * valid).sum() / valid.numel()  # fixed denominator: equal under any DDP split


# ---- metric: pycocotools COCOeval on the held-out split, in original image coordinates -------------------------------
def to_xywh(box, item):
    """Normalized [ymin, xmin, ymax, xmax] -> COCO [x, y, w, h] in the item's original pixels."""
    return [box[1] * item["w"], box[0] * item["h"], (box[3] - box[1]) * item["w"], (box[2] - box[0]) * item["h"]]


def box_score(p, p2):
    """Score of a greedy box = p(class) x (p(ymin) p(xmin) p(ymax) p(xmax))^(1/4) x P(conf 2): how sure the model
    is of the class, of where the box is, and of its IoU (the slot-5 expected IoU; 0.5 everywhere after MLE).
    p (B, P, 6): probabilities of the greedy tokens, p2 (B, P) -> (B, P). The coordinate term ranks a box the model
    places with confidence above a guess (results/detect/probes/README.md: +0.1 AP for MLE, +1.1 tuned)."""
    return p[..., 4] * p[..., :4].log().mean(-1).exp() * p2


@torch.no_grad()
def predict(model, ds, meta, device, n_images, micro_batch=0):  # 0: 128 (1280 px COCO: less)
    """Greedy decoding -> COCO results, mean reward of the greedy prediction, boxes per image, scored by box_score
    (P(conf 2) read by one teacher-forced pass over the greedy sequence; the sampled slot holds the constant 2)."""
    model.eval()
    nc, L = len(meta["classes"]), meta["max_boxes"] * 6
    allowed, read = grammar(meta["max_boxes"], nc, (2,)).to(device), grammar(meta["max_boxes"], nc).to(device)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(min(n_images, len(ds)))),
                                         batch_size=micro_batch or 128, collate_fn=collate)
    results, rewards, nboxes, tokens_all, scores = [], [], [], [], []
    for idx, imgs, boxes, labels in tqdm(loader, desc="eval", leave=False):  # rank 0 only
        kv = model.memory_kv(imgs := imgs.to(device))  # the encoder once: the sampling and the P(conf) pass read it
        tok, logp = common.sample(model, imgs, L, temperature=0, allowed=allowed, end_token=0, kv=kv)
        gb, gl = gt_arrays(boxes, labels, meta["max_boxes"])
        batch = dict(gt_boxes=gb.to(device), gt_labels=gl.to(device), class_weights=meta["class_weights"])
        rewards.append(REWARDS[meta["reward"]](tok, batch)[0][:, 0].cpu())
        tok, p = tok[:, 0], logp[:, 0].view(len(idx), -1, 6).exp()  # p: (B, P, 6) probs of the greedy tokens
        p2 = model(imgs, tok, read, kv)[:, 5::6].float().softmax(-1)[..., 2]  # P(conf 2) = expected IoU, (B, P)
        tok, score = tok.cpu(), box_score(p, p2).cpu()
        pb, pl, pv = decode(tok, nc)
        for j, i in enumerate(idx.tolist()):
            it = ds.items[i]
            for b, c, s in zip(pb[j][pv[j]].tolist(), pl[j][pv[j]].tolist(), score[j][pv[j]].tolist()):
                results.append(dict(image_id=it["id"], category_id=meta["cat_ids"][c], bbox=to_xywh(b, it), score=s))
            nboxes.append(int(pv[j].sum()))
        tokens_all.append(tok)
        scores.append(score)
    model.train()
    return results, torch.cat(rewards).mean().item(), float(np.mean(nboxes)), torch.cat(tokens_all), torch.cat(scores)


def spearman(a, b):
    """Rank correlation (average ranks for ties); None when either side is constant or has < 2 values."""
    def rank(x):
        _, inv, cnt = np.unique(x, return_inverse=True, return_counts=True)
        return (np.cumsum(cnt) - (cnt - 1) / 2)[inv]
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(rank(np.asarray(a)), rank(np.asarray(b)))[0, 1])


def box_checks(tokens, scores, items, key, nc):
    """What COCOeval does not show, against one set of ground truth (key "" = the annotations, "true_" = the truth):
    duplicates per image (a box whose same-class GT at IoU > 0.5 another box took) and the Spearman correlation of
    each box's score with its best IoU against a same-class GT box (is the confidence learned?)."""
    gb, gl = gt_arrays([torch.from_numpy(it[key + "boxes"]) for it in items],
                       [torch.tensor(it[key + "labels"], dtype=torch.long) for it in items], tokens.shape[-1] // 6)
    dups = match(tokens[:, None], dict(gt_boxes=gb, gt_labels=gl), 0.5, [1.0] * nc)[1][:, 0]
    pb, pl, pv = decode(tokens, nc)
    iou = (box_iou(pb, gb) * (pl[:, :, None] == gl[:, None, :])).amax(-1)  # (B, P); 0 when no same-class GT
    return dict(dups_per_image=dups.mean().item(), score_iou_rho=spearman(scores[pv].numpy(), iou[pv].numpy()))


def coco_eval(gt, results, img_ids):
    """AP, AP50, AP75, AR@100 (in %) from pycocotools, on img_ids only."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    if not results:  # loadRes fails on an empty list; nothing predicted = nothing found
        return dict(AP=0.0, AP50=0.0, AP75=0.0, AR100=0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        E = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "bbox")
        E.params.imgIds = list(img_ids)
        E.evaluate()
        E.accumulate()
        E.summarize()
    return dict(AP=100 * E.stats[0], AP50=100 * E.stats[1], AP75=100 * E.stats[2], AR100=100 * E.stats[8])


def evaluate_model(model, ds, gts, meta, device, n_images, micro_batch=0):
    """Greedy predictions scored against the annotations (the headline: what a COCO user measures) and, on the
    synthetic world, against the truth: flat metrics, the truth's prefixed truth_."""
    res, r, nb, tok, score = predict(model, ds, meta, device, n_images, micro_batch)
    items = ds.items[:min(n_images, len(ds))]
    m = dict(reward=r, boxes_per_image=nb)
    for name, gt in gts.items():
        key = "true_" if name == "truth" else ""
        block = dict(coco_eval(gt, res, [it["id"] for it in items]), **box_checks(tok, score, items, key,
                                                                                   len(meta["classes"])))
        m.update({("truth_" if key else "") + k: v for k, v in block.items()})
    return m, res, tok


# ---- stages ----------------------------------------------------------------------------------------------------------
def fits(ck, path, **want):
    """A checkpoint made for other data or flags stops here, in one line, not in a shape error deep in the model."""
    if bad := [f"{k} {ck['config'][k]} (this run: {v})" for k, v in want.items() if ck["config"][k] != v]:
        raise UserError(f"{path}: a model for other data or flags: {', '.join(bad)}")
    return ck


def setup(args):
    rank, world, device = common.ddp_setup()
    torch.manual_seed(args.seed)
    tr, va, gt, names, cats = load_data(args)
    meta = dict(classes=names, cat_ids=cats, max_boxes=args.max_boxes, reward=args.reward,
                class_weights=class_weights(tr, len(names)))
    return rank, world, device, Boxes(tr, args.image_size), Boxes(va, args.image_size), gt, meta


def pretrain_encoder(args):
    """--stage encoder: the ViT alone learns every pixel's class on the synthetic training scenes."""
    if args.data != "synthetic":
        raise UserError("--stage encoder trains on the synthetic world; on COCO pass --init_encoder (a timm ViT)")
    rank, world, device = common.ddp_setup()
    torch.manual_seed(args.seed)
    scenes = common.synthetic_world("train", args.num_train, args.image_size, args.seed, **scene_flags(args))
    cfg = common.model_config(args.model, args.image_size, 1, 1, 0, 0, args.patch)  # only its ViT part is used
    common.pretrain_encoder(args, "detect", cfg, scenes, device, rank, world)


def train(args, stage):
    """mle / mle_cont / reward: one loop, the step differs. MLE: teacher-forced CE on the ground
    truth in random object order (confidence slots excluded). Reward: sample K box sets, score,
    REINFORCE on coordinates, classes and the end decision + the confidence-to-IoU loss."""
    rank, world, device, tr, va, gt, meta = setup(args)
    nc, L, master = len(meta["classes"]), args.max_boxes * 6, rank == 0
    init = args.init or (os.path.join(args.out_dir, "detect", "mle", "ckpt.pt") if stage != "mle" else "")
    if init:
        ck = fits(common.load_ckpt(init, "detect"), init, vocab=CLS0 + nc + 1, seq_len=L, image_size=args.image_size)
        cfg, state = ck["config"], ck["model"]  # prior: training steps behind the starting point
        meta = dict(ck["meta"], reward=args.reward, prior=ck["meta"].get("prior", 0) + ck["step"])
    else:
        cfg, state = common.model_config(args.model, args.image_size, CLS0 + nc + 1, L, CLS0 + nc,
                                         args.dec_layers, args.patch), None
    raw, model, opt, start, path, meta = common.stage_setup("detect", stage, args, cfg, meta, device, world, state)
    if not init and start == 0:
        with torch.no_grad():  # coordinate levels start as sin-cos of their value: level 437 looks like 438
            raw.decoder.tok.weight[COORD0:COORD0 + LEVELS + 1] = 0.03 * common.sincos(torch.arange(LEVELS + 1) / 4,
                                                                                     cfg["width"]).to(device)
        common.init_encoder(raw, args, "detect")
    allowed, sample_allowed = grammar(args.max_boxes, nc).to(device), grammar(args.max_boxes, nc, (2,)).to(device)
    log = common.Logger(os.path.dirname(path), master, resume=start)
    common.print0(f"{stage}: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params, {len(tr)} train "
                  f"images, steps {start}->{args.steps}, global batch {args.batch_size} on {world} process(es)")
    sampler = common.StepSampler(len(tr), args.batch_size, args.seed, start, args.steps, rank, world)
    loader = torch.utils.data.DataLoader(tr, batch_sampler=sampler, collate_fn=collate, num_workers=args.workers)
    b, t0 = args.batch_size // world, time.time()
    mb = args.micro_batch or b
    for step, (idx, imgs, boxes, labels) in enumerate(tqdm(loader, disable=not master, initial=start,
                                                           total=args.steps, desc=stage), start):
        common.set_lr(opt, step, args.lr, args.warmup, args.steps, args.schedule)
        pos = torch.arange(rank * b, (rank + 1) * b)  # global position of each example in the batch
        imgs = imgs.to(device)

        def mle_micro(s):
            gens = [torch.Generator().manual_seed(args.seed * 7919 + step * 4099 + int(i)) for i in pos[s]]
            tok = torch.stack([encode(bx, lb, args.max_boxes, g) for bx, lb, g in zip(boxes[s], labels[s], gens)])
            tok = tok.to(device)
            w = common.until_end(tok, 0).float()
            w[:, 5::6] = 0  # the GT's confidence is a constant 2: learning it would teach P(2) = 1, a false
            # certainty (huge gradients once the reward stage asks for IoUs); MLE knows no IoU, so it learns
            # (0.5, 0.5): scores rank by p(class) as in Pix2seq, and conf_loss starts at ln 2
            with common.autocast(device):
                loss, logits, st = common.mle_loss(model, imgs[s], tok, w, allowed)
                lc = conf_loss(logits, tok, torch.full(w[:, 5::6].shape, 0.5, device=device), nc)
            return loss + lc, dict(st, conf_loss=lc.item())

        def reward_micro(s):
            gb, gl = gt_arrays(boxes[s], labels[s], args.max_boxes)
            batch = dict(gt_boxes=gb.to(device), gt_labels=gl.to(device), class_weights=meta["class_weights"])
            noise = common.example_noise(args.seed, step, pos[s], args.samples, L)
            with common.autocast(device):
                tok, _ = common.sample(raw, imgs[s], L, args.samples, args.temperature, noise=noise,
                                       allowed=sample_allowed, end_token=0)
            r, aux = REWARDS[args.reward](tok, batch)
            m, d, iou = match(tok, batch, 0.5, batch["class_weights"])  # the confidence target, whatever the reward
            mask = common.until_end(tok, 0)
            mask[..., 5::6] = False  # confidence tokens learn from conf_loss, not from the reward
            with common.autocast(device):
                loss, logits, t, _, st = common.reinforce_loss(model, imgs[s], tok, r, mask, args.baseline,
                                                               args.grad_on, allowed)
                lc = conf_loss(logits, t, (iou[:, :1] if args.grad_on == "first" else iou).reshape(t.shape[0], -1), nc)
            nb = decode(tok, nc)[2].sum(-1).float().mean()
            return loss + args.conf_weight * lc, dict(aux, **st, reward=r.mean(), conf_loss=lc.item(), boxes=nb,
                                                      matches=m.mean(), dups=d.mean())  # aux: never clashes

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
            common.save_stage(path, "detect", raw, opt, step + 1, args, meta)
        if master and ((args.eval_every and (step + 1) % args.eval_every == 0) or done):
            m = evaluate_model(raw, va, gt, meta, device, args.eval_images, args.micro_batch)[0]  # gt: (+ truth)
            log(step + 1, **{f"val_{k}": v for k, v in m.items()})
    log(args.steps, quiet=True, replica_checksums=common.replica_checksums(raw))  # DDP kept ranks in sync?
    common.ddp_end_stage()


def draw(item, size, boxes=(), color="red", scale=4):
    """Image with boxes [(x0, y0, x1, y1, label)] in original-image pixels, each label on a tag of the box's colour."""
    img = common.open_rgb(item)
    sx, sy = size * scale / item["w"], size * scale / item["h"]
    img = img.resize((size * scale, size * scale), Image.NEAREST)
    d, font = ImageDraw.Draw(img), ImageFont.load_default(size=11)
    d.fontmode = "1"  # no anti-aliasing: two colours per box (tests count them)
    for x0, y0, x1, y1, name in boxes:
        d.rectangle([x0 * sx, y0 * sy, x1 * sx, y1 * sy], outline=color, width=2)
        tag = d.textbbox((x0 * sx + 3, y0 * sy + 3), name, font=font)  # filled: legible on any ground or shape
        d.rectangle([tag[0] - 1, tag[1] - 1, tag[2] + 1, tag[3] + 1], fill=color)
        d.text((x0 * sx + 3, y0 * sy + 3), name, fill="black" if color == "lime" else "white", font=font)
    return img


def evaluate(args):
    """Every checkpoint that exists, side by side: metrics.json, table.md, COCO results, a grid."""
    rank, world, device, tr, va, gt, meta = setup(args)
    common.ddp_end_stage()  # no collective below: rank 0 evaluates alone
    if rank:
        return
    out = os.path.join(args.out_dir, "detect", "eval")
    os.makedirs(out, exist_ok=True)
    rows, preds = {}, {}
    for name, (path, ck) in common.eval_checkpoints(args.out_dir, "detect").items():
        fits(ck, path, vocab=CLS0 + len(meta["classes"]) + 1, image_size=args.image_size)  # max_boxes: from its meta
        model = common.build_model(ck["config"], device, ck["model"], path)
        m, res, _ = evaluate_model(model, va, gt, dict(ck["meta"], reward=args.reward), device, args.eval_images,
                                   args.micro_batch)
        prior = ck["meta"].get("prior", 0)  # e.g. reward: "2500+300" = MLE steps + this stage's
        rows[name], preds[name] = dict(m, steps=f"{prior}+{ck['step']}" if prior else str(ck["step"])), res
        with open(os.path.join(out, f"results_{name}.json"), "w") as f:
            json.dump(res, f)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(rows, f, indent=1)
    items = va.items[:min(args.eval_images, len(va))]
    per_image = lambda key: np.mean([len(it[key + "labels"]) for it in items])  # noqa: E731
    table = [f"held-out {len(items)} images, greedy; {per_image(''):.2f} annotated objects per image" +
             (f", {per_image('true_'):.2f} true" if "truth" in gt else "")]
    for key, title in [("", "against the annotations (what a COCO user measures)"),
                       ("truth_", "against the truth (every object, exact boxes: only the synthetic world knows)")]:
        if key and "truth" not in gt:
            continue
        rho = lambda r: "-" if r[key + "score_iou_rho"] is None else f"{r[key + 'score_iou_rho']:.2f}"  # noqa: E731
        table += ["", title, "", "| model | steps | AP | AP50 | AP75 | AR@100 | boxes/img | dups/img | score~IoU rho "
                  "| reward |", "|---" * 10 + "|"]
        table += [f"| {n} | {r['steps']} | {r[key + 'AP']:.1f} | {r[key + 'AP50']:.1f} | {r[key + 'AP75']:.1f} | "
                  f"{r[key + 'AR100']:.1f} | {r['boxes_per_image']:.2f} | {r[key + 'dups_per_image']:.2f} | "
                  f"{rho(r)} | {'' if key else format(r['reward'], '.3f')} |" for n, r in rows.items()]
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))
    # picture: the truth (synthetic), the annotations, then every box each model predicts, with class and score
    grid, truth = [], "truth" in gt
    for i in range(min(8, len(va))):
        it, row = va.items[i], []
        for key in ["true_", ""][not truth:]:
            row.append(draw(it, args.image_size, [(x, y, x + w, y + h, meta["classes"][c]) for (x, y, w, h), c in zip(
                [to_xywh(b, it) for b in it[key + "boxes"].tolist()], it[key + "labels"])], "lime"))
        for name, res in preds.items():
            bx = [(r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3],
                   f"{meta['classes'][meta['cat_ids'].index(r['category_id'])]} {r['score']:.2f}") for r in res
                  if r["image_id"] == it["id"]]
            row.append(draw(it, args.image_size, bx, "red"))
        grid.append(row)
    common.save_grid(grid, ["truth"] * truth + ["annotations"] + list(preds), os.path.join(out, "grid.png"), scale=1)
    print(f"wrote {out}/metrics.json, table.md, results_*.json, grid.png")


def main():
    args = p.parse_args()
    preset = dict(PRESETS[args.data], **(TINY if args.tiny else {}))
    if (args.data == "coco") != bool(args.data_dir):  # --data_dir alone would silently train on the synthetic world
        raise UserError("--data coco needs --data_dir, and --data_dir needs --data coco")
    if args.data != "synthetic" and (args.missed or args.box_noise):
        raise UserError("--missed / --box_noise make the synthetic world's annotator; real data has its own")
    for k in ["model", "patch", "dec_layers", "image_size", "max_boxes", "batch_size", "samples",
              "eval_images", "num_train", "num_val", "missed", "box_noise"]:
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    if not (0 <= args.missed < 1 and args.box_noise >= 0):  # missed 1: no box left to learn
        raise UserError(f"--missed {args.missed} / --box_noise {args.box_noise}: need 0 <= missed < 1, noise >= 0")
    stages = ["encoder", "mle", "reward", "mle_cont", "eval"][args.data != "synthetic" or bool(args.init_encoder):]
    stages = stages if args.stage == "all" else [args.stage]
    given = dict(steps=args.steps, lr=args.lr, warmup=args.warmup, wd=args.wd)
    for stage in stages:
        common.stage_flags(args, preset, stage, given, "detect", REWARDS)  # mle_cont: the reward stage's lr, steps
        if stage == "eval":
            evaluate(args)
        elif stage == "encoder":
            pretrain_encoder(args)
        else:
            train(args, stage)
            args.init = ""  # --init starts the first stage; reward and mle_cont then start from this run's mle


if __name__ == "__main__":
    common.run(main)
