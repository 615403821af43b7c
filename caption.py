"""Image captioning tuned with a CIDEr-D reward (paper section 4.4, Tables 3, 4, 8; Rennie et al. 2017).

A ViT encoder and a word-level decoder learn to caption by MLE. Stage 2 samples K captions per image,
scores each with CIDEr-D against the image's references, and raises the likelihood of the samples that
beat the mean of the other K-1 (leave-one-out baseline; the paper's Table 8 uses 7 baseline samples).
EOS is one of the n-grams, so "a red square on the" cannot collect the reward of the finished caption.
On the synthetic world five annotators describe each scene, and a content metric read from the world's truth
(which objects does a caption name right?) sits next to CIDEr-D: the tuning must not buy CIDEr by saying less.

    python caption.py                   # all stages on the synthetic world: encoder, mle, reward, mle_cont, eval
    python caption.py --tiny            # every stage in about a minute (smoke test)
    python caption.py --stage encoder|mle|reward|mle_cont|eval
    python caption.py --stage reward --samples 4 --temperature 1   # Table 4 ablation: K-1 = 3 baseline samples
    torchrun --nproc_per_node=8 caption.py --stage reward --data coco --data_dir /data/coco

Measured numbers: README (Captioning) and results/caption/; paper, COCO: CIDEr-D 120.0 -> 134.5.
"""
import argparse
import json
import math
import os
import re
import time
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import common
from common import UserError

# ---- config: one flat block; presets per data source, explicit flags override ----------------------------------------
PRESETS = {
    "synthetic": dict(model="tiny", patch=8, dec_layers=3, image_size=64, batch_size=32, mle_steps=1500, temperature=.7,
                      mle_lr=1e-3, mle_warmup=100, mle_wd=0.05, reward_steps=300, reward_lr=3e-5, reward_warmup=20,
                      reward_wd=0.0, enc_lr_mult=0.1, samples=8, eval_images=500, num_train=10000, num_val=500,
                      enc_steps=3000, enc_lr=1e-3, enc_warmup=100, enc_wd=0.05),  # enc_lr_mult .1: ViT keeps shapes
    # the paper's Table 8 (ViT-B/16; its ImageNet-21k encoder init is --init_encoder)
    "coco": dict(model="B/16", patch=16, dec_layers=6, image_size=512, batch_size=256, mle_steps=5000, mle_lr=3e-4,
                 mle_warmup=1000, mle_wd=5e-6, reward_steps=10000, reward_lr=1e-5, reward_warmup=1000, reward_wd=0.0,
                 enc_lr_mult=0.1, samples=8, eval_images=5000, num_train=0, num_val=0, temperature=1.0),
}
TINY = dict(model="tiny", patch=8, dec_layers=2, image_size=32, batch_size=8, mle_steps=30, reward_steps=10,
            eval_images=16, num_train=128, num_val=16, mle_warmup=5, reward_warmup=2, samples=4, enc_steps=10,
            enc_warmup=2)  # any --data

p = argparse.ArgumentParser(description=__doc__, formatter_class=common.Help)
p.add_argument("--stage", default="all", choices=["encoder", "mle", "reward", "mle_cont", "eval", "all"],
               help="encoder: pretrain the ViT on the synthetic world's pixel classes (our stand-in for a pretrained "
                    "ViT); mle: pretrain; reward: tune from out/caption/mle; mle_cont: the fair control, MLE from the "
                    "same start at the reward stage's lr, warmup, schedule and steps (read from its checkpoint); eval: "
                    "every checkpoint side by side; all: each in turn")
p.add_argument("--data", default="synthetic", choices=["synthetic", "coco"], help="data source, picks the preset")
p.add_argument("--data_dir", default="", help="COCO root: annotations/captions_<split>.json and <split>/ images")
p.add_argument("--train_split", default="train2017", help="COCO training split (Karpathy: train = train+restval)")
p.add_argument("--val_split", default="val2017", help="COCO held-out split (Karpathy: test or val)")
p.add_argument("--karpathy", default="", help="Karpathy split json (dataset_coco.json), not captions_<split>.json")
p.add_argument("--min_count", type=int, default=1, help="words seen fewer times in training captions become UNK")
p.add_argument("--max_len", type=int, default=20, help="words per caption (longer references are cut), then EOS")
p.add_argument("--out_dir", default="out", help="stages write out_dir/caption/<stage>/")
p.add_argument("--model", default=None, help="ViT size: tiny, S/16, B/16, L/16 (preset)")
p.add_argument("--patch", type=int, default=None, help="patch size when --model has none (tiny; preset)")
p.add_argument("--dec_layers", type=int, default=None, help="decoder depth (paper: 6; preset)")
p.add_argument("--init_encoder", default="", help="mle stage's ViT weights: timm naming or encoder.pt (default: "
               "out_dir/caption/encoder/encoder.pt of --stage encoder, if it exists)")
p.add_argument("--image_size", type=int, default=None, help="square input resolution (paper: 512; preset)")
p.add_argument("--batch_size", type=int, default=None, help="global batch of images, split over processes (preset)")
p.add_argument("--micro_batch", type=int, default=0, help="per-process micro-batch: training, eval (0: whole / 128)")
p.add_argument("--steps", type=int, default=None, help="steps of this stage (preset; mle_cont: the reward stage's)")
p.add_argument("--lr", type=float, default=None, help="peak learning rate of this stage (preset)")
p.add_argument("--warmup", type=int, default=None, help="linear warmup steps of this stage (preset)")
p.add_argument("--wd", type=float, default=None, help="decoupled weight decay of this stage (preset)")
p.add_argument("--enc_lr_mult", type=float, default=None, help="encoder learning rate = lr x this (paper: 0.1; preset)")
p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"], help="optimizer (encoder stage: adamw)")
p.add_argument("--clip", type=float, default=1.0, help="gradient clipping by global norm (0: off)")
p.add_argument("--samples", type=int, default=None, help="captions sampled per image in the reward stage (K; preset)")
p.add_argument("--baseline", default="loo", choices=["none", "independent", "loo"],
               help="reward baseline: none, another sample's reward (paper Alg. 2), mean of the other K-1")
p.add_argument("--grad_on", default="all", choices=["first", "all"], help="train on sample 0 only or all K")
p.add_argument("--temperature", type=float, default=None, help="sampling temperature in the reward stage (preset)")
p.add_argument("--reward", default="cider", help="reward to optimize, a key of REWARDS: cider (CIDEr-D)")
p.add_argument("--init", default="", help="checkpoint the (first) stage starts from (default: the previous stage's)")
p.add_argument("--resume", action="store_true", help="continue this stage from its own last checkpoint")
p.add_argument("--stop_at", type=int, default=0, help="exit without saving after this step (a preempted job)")
p.add_argument("--compile", action="store_true", help="torch.compile the model for the training forward")
p.add_argument("--seed", type=int, default=0, help="seed of init, data order and sampling noise")
p.add_argument("--log_every", type=int, default=50, help="print a line every this many steps")
p.add_argument("--eval_every", type=int, default=0, help="held-out CIDEr-D every this many steps (0: at the end)")
p.add_argument("--ckpt_every", type=int, default=500, help="checkpoint every this many steps")
p.add_argument("--eval_images", type=int, default=None, help="held-out images to evaluate (preset)")
p.add_argument("--num_train", type=int, default=None, help="synthetic training scenes (preset)")
p.add_argument("--num_val", type=int, default=None, help="synthetic held-out scenes (preset)")
p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (COCO)")
p.add_argument("--tiny", action="store_true", help="tiny model, data, steps: all stages in under a minute (smoke test)")

# ---- data and token format: 0 PAD, 1 BOS, 2 EOS, 3 UNK, then words by training frequency -----------------------------
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
BAD_ENDINGS = {"a", "an", "the", "with", "and", "of", "on", "in", "to"}
BRACKETS = str.maketrans({"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ",
                          "}": " -rcb- "})
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "no", "vs", "mt", "etc"}  # keep their period, as PTB
W = r"[^\W_]"  # a letter or digit


def tokenize(s):
    """The COCO caption evaluation's words (pycocoevalcap: Stanford PTBTokenizer -lowerCase, then its punctuation
    filter), in Python: clitics split ("man's" -> man 's, "can't" -> ca n't, cannot -> can not); hyphens, slashes,
    inner periods and colons kept (t-shirt, 1/2, u.s., 12:45); brackets become -lrb- -rrb- and stay (the filter
    looks for -LRB-); $ % & # alone; other punctuation dropped. Equal to PTB on the cases in tests/test_caption.py:
    "A man's T-shirt, (red)." -> [a, man, 's, t-shirt, -lrb-, red, -rrb-]."""
    s = re.sub(rf"(?<={W})(n't|'s|'re|'ve|'ll|'d|'m)\b|(?<=\bcan)(?=not\b)", r" \1", s.lower().translate(BRACKETS))
    words = re.findall(rf"-[lr][rsc]b-|n't|'(?:s|re|ve|ll|d|m)\b|#(?![^\W\d_])|[$%&/]|[#@]?{W}+(?:[-./:'@]{W}+)*\.?", s)
    return [w[:-1] if w.endswith(".") and "." not in w[:-1] and w[:-1] not in ABBREVIATIONS else w for w in words]


def build_vocab(items, min_count):
    """Training captions -> itos: the four specials, then words seen >= min_count times, most frequent first."""
    counts = Counter(w for it in items for r in it["refs"] for w in tokenize(r))
    return SPECIALS + sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))


def encode(words, stoi, max_len):
    """Words -> tokens (max_len + 1,): ids, EOS, then PAD; words beyond max_len are cut."""
    ids = [stoi.get(w, UNK) for w in words[:max_len]] + [EOS]
    return torch.tensor(ids + [PAD] * (max_len + 1 - len(ids)))


def decode(tokens, itos):  # tokens (L,) -> the caption string, up to (not including) EOS
    t = tokens.tolist()
    return " ".join(itos[x] for x in t[:next((i for i, x in enumerate(t) if x in (EOS, PAD)), len(t))])


def grammar(vocab_size, max_len):
    """allowed (L, V): any word, UNK or EOS, never PAD or BOS; the last place only EOS (<= max_len words)."""
    a = torch.ones(max_len + 1, vocab_size, dtype=torch.bool)
    a[:, [PAD, BOS]] = False
    a[max_len] = torch.arange(vocab_size) == EOS
    return a


NUMBERS = "no one two three four five six seven eight nine ten eleven twelve".split()

# The synthetic world's five annotators. Each one describes the scene on its own, as COCO's five people do: it names
# the objects (colour + shape, a number where several share both), in its own order and words, sometimes where they
# are or how two of them sit. No reference names nothing, so no caption can match one without seeing the objects.
SHAPE_WORDS = {"square": ["square", "square", "box"], "circle": ["circle", "circle", "disc", "ball"],
               "triangle": ["triangle"], "star": ["star"], "ring": ["ring", "ring", "donut"]}  # the usual name: often
PLURALS = {"box": "boxes"}  # else + s
WHERE = {"grass": ["on the grass", "on green grass"], "water": ["in the water", "on the water"],
         "sand": ["on the sand", "on a beach"], "sky": ["under the sky", "under a blue sky", "against the sky"],
         "wall": ["in front of a wall", "against a gray wall"]}
LEADS = ["", "", "there {be}", "a picture of", "a photo of", "an image of"]


def relations(a, b):
    """What holds between every object of group a and every one of group b (boxes x0 y0 x1 y1); next to always."""
    (ax, ay), (bx, by) = ([[float(t["box"][j] + t["box"][j + 2]) / 2 for t in g] for j in (0, 1)] for g in (a, b))
    said = [max(ax) < min(bx), min(ax) > max(bx), max(ay) < min(by), min(ay) > max(by)]
    return ["next to"] + [w for w, ok in zip(["to the left of", "to the right of", "above", "below"], said) if ok]


def annotator(groups, stuff, rng, max_len):
    """One reference: the groups {(colour, shape): [things]} in this annotator's order and words, <= max_len words."""
    name = {s: str(rng.choice(w)) for s, w in SHAPE_WORDS.items()}  # an annotator keeps its word for a shape
    order = sorted(groups, key=lambda g: -sum(t["area"] for t in groups[g]) * rng.uniform(0.5, 1.5))  # large first

    def phrase(g):
        (c, s), n = g, len(groups[g])
        return f"{'an' if c[0] in 'aeiou' else 'a'} {c} {name[s]}" if n == 1 else \
            f"{NUMBERS[n]} {c} {PLURALS.get(name[s], name[s] + 's')}"
    lead = str(rng.choice(LEADS)).format(be="is" if len(groups[order[0]]) == 1 else "are")
    u = rng.random()
    where = " ".join([rng.choice(WHERE[stuff[1]])] * (u < 0.65) + [rng.choice(WHERE[stuff[0]])] * (0.35 < u < 0.8))
    rel = str(rng.choice(relations(*(groups[g] for g in order[:2])))) if len(order) > 1 and rng.random() < 0.35 else ""
    conj = "with" if rng.random() < 0.2 else "and"
    for k in range(len(order), 0, -1):  # too long: leave out the place, the relation, the lead, then the least salient
        for lw, rw, ww in [(lead, rel, where), (lead, rel, ""), (lead, "", ""), ("", "", "")]:
            ps = [phrase(g) for g in order[:k]]
            if rw and k > 1:
                ps = [f"{ps[0]} {rw} {ps[1]}"] + ps[2:]
            listing = ps[0] if len(ps) == 1 else ", ".join(ps[:-1]) + f" {conj if len(ps) == 2 else 'and'} {ps[-1]}"
            text = " ".join(x for x in [lw, listing, ww] if x)
            if len(tokenize(text)) <= max_len:
                return text
    raise UserError(f"--max_len {max_len}: too short for a colour and a shape")


def make_captions(scene, rng, max_len=20, n=5):
    """A synthetic scene's n references, one per annotator; a function of the scene and rng only."""
    keys = [(t["color"], t["name"]) for t in scene["things"]]
    groups = {g: [t for t, k in zip(scene["things"], keys) if k == g] for g in dict.fromkeys(keys)}
    refs = []
    for _ in range(20 * n):  # n different strings: an annotator who would repeat another's words writes again
        if len(refs) < n and (r := annotator(groups, scene["stuff"], rng, max_len)) not in refs:
            refs.append(r)
    return refs


def load_synthetic(split, n, size, seed, max_len=20):
    """-> items {id, image, refs (five annotators; a stream of their own), objects [(colour, shape)] of its things}."""
    scenes, sid = common.synthetic_world(split, n, size, seed), {"train": 1, "val": 2}[split]
    return [dict(id=i, image=s["image"], refs=make_captions(s, np.random.default_rng([seed, sid, i, 24]), max_len),
                 objects=[(str(t["color"]), str(t["name"])) for t in s["things"]]) for i, s in enumerate(scenes)]


def load_coco(args, split):
    """captions_<split>.json (or the Karpathy json) -> items {id, file, refs}; images without captions dropped."""
    if not os.path.isdir(args.data_dir):
        raise UserError(f"--data_dir {args.data_dir}: no such directory")
    path = args.karpathy or os.path.join(args.data_dir, "annotations", f"captions_{split}.json")
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing" + ("" if args.karpathy else " (COCO's annotations/captions_<split>.json)"))
    try:
        with open(path) as f:
            d = json.load(f)
        if args.karpathy:  # Karpathy & Fei-Fei: train = train + restval; images under data_dir/<filepath>/
            keep = {"train", "restval"} if split == "train" else {split}
            items = [dict(id=im["cocoid"], file=os.path.join(args.data_dir, im.get("filepath", ""), im["filename"]),
                          refs=[s["raw"] + "" for s in im["sentences"]]) for im in d["images"] if im["split"] in keep]
        else:
            by_id = {im["id"]: dict(id=im["id"], file=os.path.join(args.data_dir, split, im["file_name"]), refs=[])
                     for im in d["images"]}
            for k, a in enumerate(d["annotations"]):  # + "": a caption that is not a string is a TypeError
                if a["image_id"] not in by_id:  # a filtered subset's stray annotation: name it, not "KeyError: 9"
                    raise UserError(f"{path}: annotation {k}: image_id {a['image_id']!r} is not in its images")
                by_id[a["image_id"]]["refs"].append(a["caption"] + "")
            items = list(by_id.values())
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: malformed captions json ({type(e).__name__}: {str(e)[:80]})")  # COCO's or Karpathy's
    items = [dict(it, refs=r) for it in items if (r := [c for c in it["refs"] if tokenize(c)])]  # "", "...": no words
    if not items:
        raise UserError(f"{path}: no captioned images in split '{split}'")
    return items


class Images(torch.utils.data.Dataset):
    """Items -> (index, image in [-1, 1] (3, S, S)); grayscale / RGBA / any size become RGB S x S."""

    def __init__(self, items, size):
        self.items, self.size = items, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        it = self.items[i]
        img = np.asarray(common.open_rgb(it).resize((self.size, self.size), Image.BILINEAR), np.float32)
        return i, torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1


def load_data(args):
    if args.data == "synthetic":
        return (load_synthetic("train", args.num_train, args.image_size, args.seed, args.max_len),
                load_synthetic("val", args.num_val, args.image_size, args.seed, args.max_len))
    return (common.readable(load_coco(args, args.train_split), args.train_split),
            common.readable(load_coco(args, args.val_split), args.val_split))


def collate(batch):
    idx, imgs = zip(*batch)
    return torch.tensor(idx), torch.stack(imgs)


# ---- CIDEr-D, vectorized: the reward (df from training references, EOS in the n-grams) and the metric ----------------
def pad(seqs, length=None):  # lists of ints -> (N, length) int64, -1 outside each sequence
    length = max([len(s) for s in seqs] + [1]) if length is None else length
    out = torch.full((len(seqs), length), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s[:length], dtype=torch.long)
    return out


def ngrams(tok, n, base):
    """tok (M, L) of ids in [0, base - 1), -1 = none -> (M, L-n+1) one int64 per n-gram (-1 where it leaves
    the sequence). Digits are id + 1 in base `base`, so n-grams of different n never share a number."""
    if tok.shape[1] < n:
        return tok.new_full((tok.shape[0], 0), -1)
    w = tok.unfold(1, n, 1)  # (M, L-n+1, n)
    ids = ((w + 1) * base ** torch.arange(n, dtype=torch.long)).sum(-1)
    return torch.where((w >= 0).all(-1), ids, -1)


def counts(ids):
    """ids (M, G) -> the rows sorted, and (M, G) the count of each id at its first occurrence (0 elsewhere
    and at -1): a sparse bag of n-grams that searchsorted can look up."""
    s = ids.sort(-1).values
    M, G = s.shape
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    at = torch.arange(G).expand(M, G)
    starts = torch.cat([torch.where(first, at, G)[:, 1:], torch.full((M, 1), G)], 1)
    tf = starts.flip(1).cummin(1).values.flip(1) - at  # distance to the next run start = the run's length
    return s, torch.where(first & (s >= 0), tf, 0)


class CiderD:
    """CIDEr-D (pycocoevalcap's `Cider`) of token sequences, in float64 torch. Built from the references that
    define document frequencies: df(g) = #images whose references contain n-gram g, N = #images.
    Weight of n-gram g in a sentence: w(g) = count(g) * (log N - log max(1, df(g))). Per n in 1..4:
    sim_n(h, r) = sum_g min(w_h(g), w_r(g)) w_r(g) / (|w_h| |w_r|) * exp(-(l_h - l_r)^2 / (2 * 6^2)), with
    l = number of bigrams (pycocoevalcap's length). score(h) = 10 * mean_n sum_refs sim_n / #refs."""

    def __init__(self, refs, vocab_size, n=4, sigma=6.0, chunk=1024):
        # refs: one list per image of reference token lists (ints in [0, vocab_size))
        self.n, self.sigma, self.base = n, sigma, vocab_size + 1
        if self.base ** n >= 2 ** 63:
            raise ValueError(f"vocabulary of {vocab_size} words is too large for int64 {n}-gram ids")
        self.log_n = math.log(max(1, len(refs)))
        found = []
        for i in range(0, len(refs), chunk):  # each image's set of reference n-grams, counted once per image
            part = refs[i:i + chunk]
            R = max(len(r) for r in part)
            tok = pad([s for r in part for s in r + [[]] * (R - len(r))])
            grams = torch.cat([ngrams(tok, k, self.base).view(len(part), -1) for k in range(1, n + 1)], 1)
            g, tf = counts(grams)
            found.append(g[tf > 0])
        ids, df = torch.unique(torch.cat(found + [torch.zeros(0, dtype=torch.long)]), return_counts=True)
        self.df_ids = torch.cat([torch.tensor([-2]), ids])  # a sentinel below every id: never empty, never hit
        self.df_log = torch.cat([torch.zeros(1, dtype=torch.float64), df.double().log()])

    def vectors(self, tok):
        """tok (M, L) -> per n (sorted ids (M, G), w (M, G): the weight at each id's first place, else 0),
        norms (M, n), lengths (M,)."""
        out, norms = [], []
        for k in range(1, self.n + 1):
            ids, tf = counts(ngrams(tok, k, self.base))
            pos = torch.searchsorted(self.df_ids, ids).clamp(max=len(self.df_ids) - 1)
            w = tf * (self.log_n - torch.where(self.df_ids[pos] == ids, self.df_log[pos], 0.0))  # df 0: log 1 = 0
            out.append((ids, w))
            norms.append(w.pow(2).sum(-1).sqrt())
        return out, torch.stack(norms, -1), ((tok >= 0).sum(-1) - 1).clamp(min=0)

    def score(self, hyp, refs, img, nref):
        """hyp (M, L) hypotheses; refs (I, R, Lr) references of I images (-1 padded); img (M,) the image of
        each hypothesis; nref (I,) references per image -> (M,) float64. Each image's reference vectors
        are computed once and shared by all of its hypotheses (K samples -> one reference pass)."""
        I, R, _ = refs.shape
        (hv, hn, hl), (rv, rn, rl) = self.vectors(hyp), self.vectors(refs.reshape(I * R, -1))
        total = torch.zeros(len(hyp), R, dtype=torch.float64)
        for k in range(self.n):
            (hi, hw), (ri, rw) = hv[k], rv[k]
            if ri.shape[1] == 0:  # sequences too short for this n
                continue
            ri, rw = ri.view(I, R, -1)[img], rw.view(I, R, -1)[img]  # (M, R, Gr)
            q = hi[:, None, :].expand(-1, R, -1).contiguous()  # (M, R, Gh): look each hypothesis n-gram up
            at = torch.searchsorted(ri, q).clamp(max=ri.shape[-1] - 1)  # in each sorted reference
            wr = torch.where(ri.gather(-1, at) == q, rw.gather(-1, at), 0.0)  # w_r(g) of the hypothesis' g
            num = (torch.minimum(hw[:, None, :], wr) * wr).sum(-1)
            den = hn[:, None, k] * rn.view(I, R, -1)[img][..., k]
            total += torch.where(den > 0, num / den.clamp(min=1e-300), num)
        pen = torch.exp(-((hl[:, None] - rl.view(I, R)[img]).double() ** 2) / (2 * self.sigma ** 2))
        return 10 * (total * pen).sum(-1) / self.n / nref[img].double()


def cider_d(gts, res):
    """pycocoevalcap `Cider().compute_score(gts, res)`: gts {image: [reference strings]}, res {image: [one
    hypothesis]} -> (corpus score, per-image scores (numpy, in gts order)). Words are whitespace-separated,
    as there (tokenize first); document frequencies come from this set's references."""
    if gts.keys() != res.keys():
        raise ValueError("gts and res must have the same image ids")
    words = {}
    enc = lambda s: [words.setdefault(w, len(words)) for w in s.split()]  # noqa: E731
    ids = list(gts)
    refs, hyps = [[enc(r) for r in gts[i]] for i in ids], [enc(res[i][0]) for i in ids]
    scorer, scores = CiderD(refs, max(len(words), 1)), []
    for a in range(0, len(ids), 256):
        part = refs[a:a + 256]
        R = max(len(r) for r in part)
        rt = pad([s for r in part for s in r + [[]] * (R - len(r))]).view(len(part), R, -1)
        scores.append(scorer.score(pad(hyps[a:a + 256]), rt, torch.arange(len(part)),
                                   torch.tensor([len(r) for r in part])))
    scores = torch.cat(scores).numpy() if scores else np.zeros(0)
    return float(np.mean(scores)), scores


def reward_cider(pred, batch):
    """CIDEr-D reward of each sample, EOS included as a word (sample and references): r = 10 * mean_n
    mean_refs sum_g min(w_h, w_r) w_r / (|w_h| |w_r|) x exp(-(l_h - l_r)^2 / 72), w from training df.
    pred (B, K, L) -> r (B, K)."""
    B, K, L = pred.shape
    hyp = torch.where(common.until_end(pred, EOS) & (pred != PAD), pred, -1).view(B * K, L).cpu()
    r = batch["cider"].score(hyp, batch["refs"], torch.arange(B).repeat_interleave(K), batch["nref"])
    return r.view(B, K).float().to(pred.device), dict(length=((hyp >= 0).sum(-1).float() - 1).mean(),
                                                      ended=(pred == EOS).any(-1).float().mean())


REWARDS = {"cider": reward_cider}


def ref_batch(items, idx, stoi, max_len):
    """References of the images idx, as the reward reads them: (B, R, max_len + 1) tokens incl. EOS, -1 padded."""
    refs = [[encode(tokenize(r), stoi, max_len) for r in items[i]["refs"]] for i in idx.tolist()]
    R = max(len(r) for r in refs)
    out = torch.full((len(refs), R, max_len + 1), -1, dtype=torch.long)
    for b, rs in enumerate(refs):
        for j, t in enumerate(rs):
            out[b, j] = torch.where(common.until_end(t, EOS), t, -1)
    return out, torch.tensor([len(r) for r in refs])


# ---- metrics: CIDEr-D over the held-out set (df from its references, as the COCO evaluation), content ----------------
SHAPE_OF = {w: s for s, ws in SHAPE_WORDS.items() for w in ws + [PLURALS.get(x, x + "s") for x in ws]}  # folded
NUMBER_OF = {"a": 1, "an": 1} | {w: i for i, w in enumerate(NUMBERS) if i}


def named(caption):
    """{(colour, shape): the number said before it, or None} for every colour word directly followed by a shape
    word; synonyms and plurals folded ("two red boxes" -> (red, square): 2); "a" / "an" says 1."""
    w, out = [""] + tokenize(caption), {}
    for before, colour, shape in zip(w, w[1:], w[2:]):
        if colour in common.COLORS and shape in SHAPE_OF:
            out.setdefault((colour, SHAPE_OF[shape]), NUMBER_OF.get(before))
    return out


def content_metrics(captions, objects):
    """What captions say is in the picture, against the world's truth (objects: each scene's (colour, shape) of every
    thing). N = the pairs a caption names (`named`), S = the scene's, each group of equal colour and shape once:
    P = |N & S| / |N|, R = |N & S| / |S|, F1 = 2PR / (P + R), all 0 for a caption naming nothing; means over captions.
    Count accuracy: of all named pairs with a number said, those whose number is the scene's count. Not SPICE, which
    parses objects, attributes and relations out of caption and references, matches them with WordNet synonyms and
    scores F1 against the references' tuples ("a star" and "something red" earn credit apart; an object no reference
    names is wrong even if it is there). Here a pair counts only if said whole, against the exact truth, never the
    references; relations and background are not scored. A metric, not a reward."""
    P, R, F, counts_right = [], [], [], []
    for cap, objs in zip(captions, objects):
        truth, said = Counter(map(tuple, objs)), named(cap)
        hit = sum(g in truth for g in said)
        p, r = hit / max(len(said), 1), hit / max(len(truth), 1)
        P, R, F = P + [p], R + [r], F + [2 * p * r / (p + r) if hit else 0.0]
        counts_right += [n == truth[g] for g, n in said.items() if n is not None]  # truth[g] = 0 if not there
    return dict(content_precision=float(np.mean(P)), content_recall=float(np.mean(R)), content_F1=float(np.mean(F)),
                count_accuracy=float(np.mean(counts_right)) if counts_right else None)


def caption_metrics(results, items):
    """CIDEr-D (x100, as papers report it), mean length in words, % captions ending in a bad word; on the synthetic
    world (items with "objects") also content_metrics."""
    by_id = {it["id"]: it for it in items}
    res = {r["image_id"]: [r["caption"]] for r in results}
    score, _ = cider_d({i: [" ".join(tokenize(x)) for x in by_id[i]["refs"]] for i in res}, res)
    words = [r["caption"].split() for r in results]
    m = dict(CIDEr=100 * score, length=float(np.mean([len(w) for w in words])),
             bad_endings=100 * float(np.mean([bool(w) and w[-1] in BAD_ENDINGS for w in words])))
    if results and all("objects" in by_id[i] for i in res):
        m.update(content_metrics([r["caption"] for r in results], [by_id[r["image_id"]]["objects"] for r in results]))
    return m


def human_metrics(items):
    """The human level: each image's first reference (a random annotator: they are in no order) scored as a caption
    against the others, as COCO's human CIDEr is measured. Its CIDEr-D sees one reference fewer than the models'."""
    res = [dict(image_id=it["id"], caption=" ".join(tokenize(it["refs"][0]))) for it in items]
    return caption_metrics(res, [dict(it, refs=it["refs"][1:]) for it in items])


@torch.no_grad()
def evaluate_model(model, ds, meta, device, n_images, micro_batch=0):  # 0: 128
    """Greedy captions of the first n_images -> (caption_metrics, [{"image_id", "caption"}] (COCO results format))."""
    model.eval()
    allowed = grammar(len(meta["itos"]), meta["max_len"]).to(device)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(min(n_images, len(ds)))),
                                         batch_size=micro_batch or 128, collate_fn=collate)
    out = []
    for idx, imgs in tqdm(loader, desc="eval", leave=False):  # rank 0 only
        tok, _ = common.sample(model, imgs.to(device), meta["max_len"] + 1, temperature=0, allowed=allowed,
                               end_token=EOS, pad_token=PAD)
        out += [dict(image_id=ds.items[i]["id"], caption=decode(t, meta["itos"])) for i, t in
                zip(idx.tolist(), tok[:, 0].cpu())]
    model.train()
    return caption_metrics(out, ds.items[:n_images]), out


# ---- stages ----------------------------------------------------------------------------------------------------------
def setup(args, vocab=None):
    rank, world, device = common.ddp_setup()
    torch.manual_seed(args.seed)
    tr, va = load_data(args)
    meta = dict(itos=vocab or build_vocab(tr, args.min_count), max_len=args.max_len, reward=args.reward)
    return rank, world, device, Images(tr, args.image_size), Images(va, args.image_size), meta


def pretrain_encoder(args):
    """--stage encoder: the ViT alone learns every pixel's class on the synthetic training scenes (as detect.py)."""
    if args.data != "synthetic":
        raise UserError("--stage encoder trains on the synthetic world; on COCO pass --init_encoder (a timm ViT)")
    rank, world, device = common.ddp_setup()
    torch.manual_seed(args.seed)
    scenes = common.synthetic_world("train", args.num_train, args.image_size, args.seed)  # load_synthetic's, cached
    cfg = common.model_config(args.model, args.image_size, 1, 1, 0, 0, args.patch)  # only its ViT part is used
    common.pretrain_encoder(args, "caption", cfg, scenes, device, rank, world)


def train(args, stage):
    """mle / mle_cont / reward: one loop, the step differs. MLE: teacher-forced CE on one reference per
    image, drawn at random each step. Reward: sample K captions, CIDEr-D each, REINFORCE with the
    leave-one-out baseline on every word and on the end of the caption."""
    init = args.init or (os.path.join(args.out_dir, "caption", "mle", "ckpt.pt") if stage != "mle" else "")
    ck = common.load_ckpt(init, "caption") if init else None
    rank, world, device, tr, va, meta = setup(args, ck["meta"]["itos"] if ck else None)
    if ck:  # prior: training steps behind the starting point
        meta = dict(ck["meta"], prior=ck["meta"].get("prior", 0) + ck["step"])
    V, L, master = len(meta["itos"]), meta["max_len"] + 1, rank == 0
    cfg, state = (ck["config"], ck["model"]) if ck else (
        common.model_config(args.model, args.image_size, V, L, BOS, args.dec_layers, args.patch), None)
    raw, model, opt, start, path, meta = common.stage_setup("caption", stage, args, cfg, meta, device, world, state)
    if not ck and start == 0:
        common.init_encoder(raw, args, "caption")
    stoi = {w: i for i, w in enumerate(meta["itos"])}
    allowed = grammar(V, meta["max_len"]).to(device)
    if stage == "reward":  # df of the reward: the training references' tokens, EOS included
        refs = [[encode(tokenize(x), stoi, meta["max_len"]).tolist() for x in it["refs"]] for it in tr.items]
    cider = CiderD([[t[:t.index(EOS) + 1] for t in r] for r in refs], V) if stage == "reward" else None
    log = common.Logger(os.path.dirname(path), master, resume=start)
    common.print0(f"{stage}: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params, {len(tr)} train images, {V} "
                  f"tokens, steps {start}->{args.steps}, global batch {args.batch_size} on {world} process(es)")
    sampler = common.StepSampler(len(tr), args.batch_size, args.seed, start, args.steps, rank, world)
    loader = torch.utils.data.DataLoader(tr, batch_sampler=sampler, collate_fn=collate, num_workers=args.workers)
    b, t0 = args.batch_size // world, time.time()
    mb = args.micro_batch or b
    for step, (idx, imgs) in enumerate(tqdm(loader, disable=not master, initial=start, total=args.steps,
                                            desc=stage), start):
        common.set_lr(opt, step, args.lr, args.warmup, args.steps, args.schedule)
        pos = torch.arange(rank * b, (rank + 1) * b)  # global position of each example in the batch
        imgs = imgs.to(device)

        def mle_micro(s):
            refs = [tr.items[i]["refs"] for i in idx[s].tolist()]
            pick = [np.random.default_rng([args.seed, step, int(g)]).integers(len(r)) for r, g in zip(refs, pos[s])]
            tok = torch.stack([encode(tokenize(r[j]), stoi, meta["max_len"]) for r, j in zip(refs, pick)]).to(device)
            with common.autocast(device):
                loss, _, st = common.mle_loss(model, imgs[s], tok, common.until_end(tok, EOS).float(), allowed)
            return loss, st

        def reward_micro(s):
            refs, nref = ref_batch(tr.items, idx[s], stoi, meta["max_len"])
            noise = common.example_noise(args.seed, step, pos[s], args.samples, L)
            with common.autocast(device):
                tok, _ = common.sample(raw, imgs[s], L, args.samples, args.temperature, noise=noise, allowed=allowed,
                                       end_token=EOS, pad_token=PAD)
            r, aux = REWARDS[args.reward](tok, dict(cider=cider, refs=refs, nref=nref))
            with common.autocast(device):
                loss, _, _, _, st = common.reinforce_loss(model, imgs[s], tok, r, common.until_end(tok, EOS),
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
            common.save_stage(path, "caption", raw, opt, step + 1, args, meta)
        if master and ((args.eval_every and (step + 1) % args.eval_every == 0) or done):
            m = evaluate_model(raw, va, meta, device, args.eval_images, args.micro_batch)[0]
            log(step + 1, **{f"val_{k}": v for k, v in m.items()})
    log(args.steps, quiet=True, replica_checksums=common.replica_checksums(raw))  # DDP kept ranks in sync?
    common.ddp_end_stage()


def wrap(text, font, width):
    """Words -> lines no wider than width pixels in font (a longer word keeps a line of its own)."""
    lines = [""]
    for w in text.split():
        if lines[-1] and font.getlength(f"{lines[-1]} {w}") > width:
            lines.append("")
        lines[-1] = f"{lines[-1]} {w}".strip()
    return lines


def panel(text, size, font):
    """A white square with the text wrapped to its width."""
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).multiline_text((4, 3), "\n".join(wrap(text, font, size - 8)), "black", font, spacing=3)
    return img


def evaluate(args):
    """Every checkpoint that exists, side by side, and the human level (one annotator against the others):
    metrics.json, table.md, captions json, a grid."""
    cks = common.eval_checkpoints(args.out_dir, "caption")  # {name: (path, ckpt)}: mle and its two tunings
    rank, world, device, tr, va, meta = setup(args, next(iter(cks.values()))[1]["meta"]["itos"])
    common.ddp_end_stage()  # no collective below: rank 0 evaluates alone
    if rank:
        return
    os.makedirs(out := os.path.join(args.out_dir, "caption", "eval"), exist_ok=True)
    rows, preds = {}, {}
    for name, (path, ck) in cks.items():
        model = common.build_model(ck["config"], device, ck["model"], path, args.image_size)
        m, res = evaluate_model(model, va, ck["meta"], device, args.eval_images, args.micro_batch)
        prior = ck["meta"].get("prior", 0)  # e.g. reward: "1500+300" = MLE steps + this stage's
        rows[name], preds[name] = dict(m, steps=f"{prior}+{ck['step']}" if prior else str(ck["step"])), res
        with open(os.path.join(out, f"captions_{name}.json"), "w") as f:
            json.dump(res, f)
    if two := [it for it in va.items[:args.eval_images] if len(it["refs"]) > 1]:  # a human level needs two refs
        rows["human"] = dict(human_metrics(two), steps="-")
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(rows, f, indent=1)
    cols = [("CIDEr-D", "CIDEr", ".1f"), ("content F1", "content_F1", ".3f"), ("precision", "content_precision", ".3f"),
            ("recall", "content_recall", ".3f"), ("counts right", "count_accuracy", ".3f"), ("words", "length", ".2f"),
            ("bad endings %", "bad_endings", ".1f")]
    cols = [c for c in cols if c[1] in rows[next(iter(cks))]]  # COCO: no content columns (no truth of a photo)
    table = [f"held-out {min(args.eval_images, len(va))} images, greedy; human: each image's first reference against "
             "the others", "", "| model | steps | " + " | ".join(c[0] for c in cols) + " |", "|---" * (2 + len(cols))
             + "|"]
    table += [f"| {n} | {r['steps']} | " + " | ".join("-" if r[k] is None else format(r[k], f) for _, k, f in cols) +
              " |" for n, r in rows.items()]
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))
    S, font = 224, ImageFont.load_default(size=15)  # picture: the image, one reference, then each model's caption
    grid = [[common.open_rgb(va.items[i]).resize((S, S), Image.NEAREST), panel(va.items[i]["refs"][0], S, font)] +
            [panel(preds[n][i]["caption"], S, font) for n in preds] for i in range(min(8, args.eval_images, len(va)))]
    common.save_grid(grid, ["image", "a reference"] + list(preds), os.path.join(out, "grid.png"), scale=1)
    print(f"wrote {out}/metrics.json, table.md, captions_*.json, grid.png")


def main():
    args = p.parse_args()
    preset = dict(PRESETS[args.data], **(TINY if args.tiny else {}))
    if (args.data == "coco") != bool(args.data_dir) or args.karpathy and not args.data_dir:  # else: synthetic
        raise UserError("--data coco needs --data_dir, and --data_dir / --karpathy need --data coco")
    for k in ["model", "patch", "dec_layers", "image_size", "batch_size", "samples", "enc_lr_mult", "eval_images",
              "num_train", "num_val", "temperature"]:
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    stages = ["encoder", "mle", "reward", "mle_cont", "eval"][args.data != "synthetic" or bool(args.init_encoder):]
    stages = stages if args.stage == "all" else [args.stage]
    given = dict(steps=args.steps, lr=args.lr, warmup=args.warmup, wd=args.wd)
    for stage in stages:
        common.stage_flags(args, preset, stage, given, "caption", REWARDS)  # mle_cont: the reward stage's lr, steps
        if stage == "eval":
            evaluate(args)
        elif stage == "encoder":
            pretrain_encoder(args)
        else:
            train(args, stage)
            args.init = ""  # --init starts the first stage; reward and mle_cont then start from this run's mle


if __name__ == "__main__":
    common.run(main)
