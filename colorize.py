"""Colorization tuned with a colorfulness reward (paper section 4.3, Table 7; UViM, Kolesnikov et al. 2022).

Stage I (`--stage oracle`: vqvae.py's VQ-VAE trained on these images) learns 256 discrete codes for the colours
of an image given its gray version. Stage II: a ViT encoder reads the gray image and a decoder writes those codes
(token = code + 1, BOS 0); the frozen oracle decodes them back to colours. MLE imitates the true colours, which the
gray image does not determine (an object's hue is a guess), so the model hedges. The reward stage samples
K colourings, scores each with colorfulness = vivid fraction x hue entropy, and raises the likelihood of
those above the mean of the other K-1. Colorfulness counts pixels, so confetti (every patch its own hue) scores as
well as coloured objects: `--reward vivid_coherent` multiplies it by the squared agreement of the colours of
pixels one code apart where the gray image has no edge (a reward written in ten minutes; it needs no segments), and
the eval table's coherence (synthetic world: the share of each true segment in its most common colour) shows which
one you got.

    python colorize.py              # the synthetic world, every stage: oracle, encoder, mle, reward, mle_cont, eval
    python colorize.py --tiny       # every stage in about a minute (smoke test)
    python colorize.py --stage oracle|encoder|mle|reward|mle_cont|eval
    python colorize.py --data folder --data_dir ~/photos   # any folder of JPEG/PNG photos
    python colorize.py --stage oracle --oracle_flags "--steps 4000 --width 256"   # vqvae.py's flags

Measured on the synthetic world (2 CPU cores, 29.6 min; README, results/colorize/), held-out 300 scenes, one sample
each at temperature 1, top_p 0.9: colorfulness MLE 0.307, MLE continued 0.308, reward-tuned 0.685 (coherence 0.838 ->
0.801), --reward vivid_coherent 0.684 (coherence 0.826); paper, ImageNet: 0.41 -> 1.79. Both rewards paint the grounds:
objects coloured apart from their ground 0.437 -> 0.326 / 0.213 (truth 0.945).
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import common
import vqvae
from common import UserError

# ---- config: one flat block; presets per data source, explicit flags override ----------------------------------------
PRESETS = {
    # with vqvae's preset (one code per 4 x 4 patch): 2400 MLE steps (2000: objects distinct 0.28, 2400: 0.44); top_p
    # 0.9: the T = 1 samples' incoherence is the tail of each code's distribution (results/colorize/probes/coherence/);
    # 50 reward steps: past them each reward breaks a bar of issue 23 (results/colorize/probes/default_4px_evals/)
    "synthetic": dict(model="tiny", patch=8, dec_layers=3, batch_size=16, mle_steps=2400, mle_lr=1e-3,
                      mle_warmup=100, mle_wd=0.05, reward_steps=50, reward_lr=3e-5, reward_warmup=0, reward_wd=0.0,
                      enc_lr_mult=1.0, samples=2, eval_images=300, num_train=10000, num_val=300, enc_steps=2500,
                      enc_lr=1e-3, enc_warmup=100, enc_wd=0.05, top_p=0.9),
    # real photos (the paper: ImageNet, ViT-L/16 at 512, Table 7: batch 512, constant lr 3e-7, 1k steps)
    "folder": dict(model="B/16", patch=16, dec_layers=6, batch_size=64, mle_steps=20000, mle_lr=1e-3,
                   mle_warmup=1000, mle_wd=1e-6, reward_steps=1000, reward_lr=3e-7, reward_warmup=0, reward_wd=0.0,
                   enc_lr_mult=0.1, samples=2, eval_images=500, num_train=0, num_val=500, top_p=1.0),
}
TINY = dict(model="tiny", patch=8, dec_layers=2, batch_size=8, mle_steps=30, reward_steps=10, eval_images=8,
            num_train=64, num_val=8, mle_warmup=5, samples=2, enc_steps=10, enc_warmup=2)
# --tiny with any --data: the tiny model too (the folder preset's is B/16); its image size is the oracle's, always
# (vqvae.TINY: 32 px, so 4 x 4 patches of 8)

p = argparse.ArgumentParser(description=__doc__, formatter_class=common.Help)
p.add_argument("--stage", default="all", choices=["oracle", "encoder", "mle", "reward", "mle_cont", "eval", "all"],
               help="oracle: UViM's stage I, vqvae.py's VQ-VAE on these images (out/vqvae_colorize/); encoder: the ViT "
                    "learns the synthetic world's pixel classes from the gray image (a stand-in for a pretrained ViT); "
                    "mle: pretrain; reward: tune from out/colorize/mle; mle_cont: the fair control, MLE from the same "
                    "start at the reward stage's lr, warmup, schedule and steps (from its checkpoint); eval: every "
                    "checkpoint side by side; all: each in turn (an oracle already trained with the same flags is "
                    "reused, --oracle PATH skips that stage)")
p.add_argument("--data", default="synthetic", choices=["synthetic", "folder"], help="data source, picks the preset")
p.add_argument("--data_dir", default="", help="folder of JPEG/PNG images, searched recursively (--data folder)")
p.add_argument("--oracle", default="", help="stage I checkpoint (default: out_dir/vqvae_colorize/ckpt.pt)")
p.add_argument("--oracle_flags", default="", help="--stage oracle: vqvae.py's flags (python vqvae.py --help; default: "
               "its preset for --data), e.g. \"--steps 4000 --width 256\" or --oracle_flags=--no-local; --data "
               "--data_dir --out_dir --seed --resume --tiny --workers --compile are this script's")
p.add_argument("--out_dir", default="out", help="stages write out_dir/colorize/<stage>/")
p.add_argument("--model", default=None, help="ViT size: tiny, S/16, B/16, L/16 (preset)")
p.add_argument("--patch", type=int, default=None, help="patch size when --model has none (tiny; preset)")
p.add_argument("--dec_layers", type=int, default=None, help="decoder depth (UViM: 24; preset)")
p.add_argument("--init_encoder", default="", help="mle stage's ViT weights: timm naming or encoder.pt (default: "
               "out_dir/colorize/encoder/encoder.pt of --stage encoder, if it exists)")
p.add_argument("--batch_size", type=int, default=None, help="global batch of images, split over processes (preset)")
p.add_argument("--micro_batch", type=int, default=0, help="per-process micro-batch: training, eval (0: whole / 50)")
p.add_argument("--steps", type=int, default=None, help="steps of this stage (preset; mle_cont: the reward stage's)")
p.add_argument("--lr", type=float, default=None, help="peak learning rate of this stage (preset)")
p.add_argument("--warmup", type=int, default=None, help="linear warmup steps of this stage (preset)")
p.add_argument("--wd", type=float, default=None, help="decoupled weight decay of this stage (preset)")
p.add_argument("--enc_lr_mult", type=float, default=None, help="encoder learning rate = lr x this (UViM: 0.1; preset)")
p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"], help="optimizer")
p.add_argument("--clip", type=float, default=1.0, help="gradient clipping by global norm (0: off)")
p.add_argument("--samples", type=int, default=None, help="colourings sampled per image in the reward stage (K; preset)")
p.add_argument("--baseline", default="loo", choices=["none", "independent", "loo"],
               help="reward baseline: none, another sample's reward (paper Alg. 2), mean of the other K-1")
p.add_argument("--grad_on", default="all", choices=["first", "all"], help="train on sample 0 only or all K")
p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature in the reward stage")
p.add_argument("--eval_temperature", type=float, default=1.0,
               help="sampling temperature at eval (UViM's colorization: 1.0; 0 = greedy); noise fixed per image")
p.add_argument("--top_p", type=float, default=None, help="nucleus sampling in the reward stage and at eval: each code "
               "from the smallest set holding this much probability (preset; 1: every code)")
p.add_argument("--reward", default="colorfulness",
               help="reward to optimize, a key of REWARDS: the paper's colorfulness, or vivid_coherent: it x the "
                    "squared agreement of the colours of pixels one code apart where the gray image has no edge (its "
                    "stage writes <out_dir>/colorize/reward_vivid_coherent/: eval shows both rows)")
p.add_argument("--init", default="", help="checkpoint the (first) stage starts from (default: the previous stage's)")
p.add_argument("--resume", action="store_true", help="continue this stage from its own last checkpoint")
p.add_argument("--stop_at", type=int, default=0, help="exit without saving after this step (a preempted job)")
p.add_argument("--compile", action="store_true", help="torch.compile the model for the training forward")
p.add_argument("--seed", type=int, default=0, help="seed of init, data order and sampling noise")
p.add_argument("--log_every", type=int, default=50, help="print a line every this many steps")
p.add_argument("--eval_every", type=int, default=0, help="held-out colorfulness every this many steps (0: at the end)")
p.add_argument("--ckpt_every", type=int, default=500, help="checkpoint every this many steps")
p.add_argument("--eval_images", type=int, default=None, help="held-out images to evaluate (preset)")
p.add_argument("--num_train", type=int, default=None, help="synthetic training scenes (preset)")
p.add_argument("--num_val", type=int, default=None, help="held-out images: synthetic scenes, or photos taken out "
                                                          "of the folder (at most 10%%; preset)")
p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (folder)")
p.add_argument("--tiny", action="store_true", help="tiny model, data, steps: all stages in under a minute (smoke test)")

# ---- colour: sRGB <-> CIE Lab (D65), the gray input ------------------------------------------------------------------
RGB2XYZ = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
WHITE = (0.95047, 1.0, 1.08883)  # D65 reference white, XYZ (= the matrix's row sums: R = G = B has a = b = 0)


def lab_to_srgb(L, a, b):
    """CIE Lab (D65) -> sRGB in [0, 1] (numpy, clipped)."""
    fy = (L + 16) / 116
    f = np.stack([fy + a / 500, fy, fy - b / 200], -1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * np.array([0.95047, 1.0, 1.08883])
    lin = xyz @ np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]]).T
    return np.clip(np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * np.abs(lin) ** (1 / 2.4) - 0.055), 0, 1)


def linear(rgb):  # sRGB in [0, 1] -> linear light (the sRGB transfer function, inverted)
    return torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb.clamp(min=0) + 0.055) / 1.055) ** 2.4)


def srgb_to_lab(rgb):
    """(N, 3, H, W) sRGB in [0, 1] -> L, a, b, each (N, H, W): linearize, XYZ (D65), Lab."""
    xyz = torch.einsum("ij,njhw->nihw", torch.tensor(RGB2XYZ, dtype=rgb.dtype, device=rgb.device), linear(rgb))
    t = xyz / torch.tensor(WHITE, dtype=rgb.dtype, device=rgb.device)[:, None, None]
    f = torch.where(t > (6 / 29) ** 3, t.clamp(min=1e-12) ** (1 / 3), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return 116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])


def to_gray(rgb):
    """(N, 3, H, W) sRGB in [0, 1] -> the gray of the same CIE luminance Y (so the same L*), 3 channels.
    The synthetic objects share one L*: in this gray they are indistinguishable whatever their hue."""
    y = torch.einsum("j,njhw->nhw", torch.tensor(RGB2XYZ[1], dtype=rgb.dtype, device=rgb.device), linear(rgb))
    g = torch.where(y <= 0.0031308, 12.92 * y, 1.055 * y.clamp(min=0) ** (1 / 2.4) - 0.055)
    return g[:, None].expand(-1, 3, -1, -1)


# ---- data and token format: the oracle's 256 codes, token = code + 1, token 0 = BOS (never emitted) ------------------
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def recolour_stuff(scene, rng, muted=0.7, keep_chroma=0.15):
    """Backgrounds as in photos: mostly low-chroma (a wall, haze, sand), sometimes a vivid colour, and the gray
    image does not tell which nor which hue. Each stuff region is turned by a random hue angle (L* kept) and,
    with probability 0.7, its chroma is cut to 15% (below the vivid threshold). Objects are left as drawn:
    their hues already share one L*. (H, W, 3) uint8 -> (H, W, 3) uint8."""
    rgb = torch.from_numpy(scene["image"]).permute(2, 0, 1)[None].double() / 255
    L, a, b = (x[0].numpy() for x in srgb_to_lab(rgb))
    out = scene["image"].copy()
    for seg in scene["segments"]:
        if common.CATEGORIES[seg["category_id"] - 1]["isthing"]:
            continue
        m = scene["panoptic"] == seg["id"]
        t, k = rng.uniform(-math.pi, math.pi), keep_chroma if rng.random() < muted else 1.0
        a2, b2 = k * (a[m] * math.cos(t) - b[m] * math.sin(t)), k * (a[m] * math.sin(t) + b[m] * math.cos(t))
        out[m] = (lab_to_srgb(L[m], a2, b2) * 255).round().astype(np.uint8)
    return out


def load_synthetic(split, n, size, seed):
    """The shared synthetic world with photo-like backgrounds (recolour_stuff, seeded per scene), each with its
    panoptic map (S, S) of segment ids (0 = void; the scenes are drawn at the model's size S): coherence's segments."""
    scenes = common.synthetic_world(split, n, size, seed)
    return [dict(id=i, image=recolour_stuff(s, np.random.default_rng([seed, 7, len(split), i])),  # 5: train, 3: val
                 panoptic=s["panoptic"], things=[x["id"] for x in s["segments"]  # the cached array, not a copy
                                                 if common.CATEGORIES[x["category_id"] - 1]["isthing"]])
            for i, s in enumerate(scenes)]


def load_folder(args):
    """Every image file under --data_dir (recursive, sorted), unreadable ones skipped with a count.
    Held out: a fixed random num_val (at most 10%), the same for any --seed."""
    if not os.path.isdir(args.data_dir):
        raise UserError(f"--data_dir {args.data_dir}: no such directory")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.data_dir) for f in fs
                   if f.lower().endswith(IMAGE_EXT))
    if not files:
        raise UserError(f"--data_dir {args.data_dir}: no {'/'.join(IMAGE_EXT)} files")
    items = common.readable([dict(id=os.path.relpath(f, args.data_dir), file=f) for f in files], args.data_dir)
    order = np.random.default_rng(0).permutation(len(items))
    if len(items) == 1:  # nothing to hold out: a smoke test, not a measurement
        common.print0(f"warning: --data_dir {args.data_dir}: one readable image, used for training and held out")
    n_val = max(1, min(args.num_val, len(items) // 10)) if len(items) > 1 else 0
    return [items[i] for i in order[n_val:]] or items, [items[i] for i in order[:n_val]] or items


def load_data(args):
    if args.data == "synthetic":
        return (load_synthetic("train", args.num_train, args.image_size, args.seed),
                load_synthetic("val", args.num_val, args.image_size, args.seed))
    return load_folder(args)


class Photos(torch.utils.data.Dataset):
    """Items -> (index, gray (3, S, S), colour (3, S, S)), both in [-1, 1]; files are centre-cropped to a
    square and resized; grayscale / RGBA / palette files become RGB."""

    def __init__(self, items, size):
        self.items, self.size = items, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img = common.open_rgb(self.items[i])
        s = min(img.size)
        img = img.crop(((img.width - s) // 2, (img.height - s) // 2, (img.width + s) // 2, (img.height + s) // 2))
        rgb = torch.from_numpy(np.asarray(img.resize((self.size, self.size), Image.BICUBIC), np.float32) / 255)
        rgb = rgb.permute(2, 0, 1)
        return i, to_gray(rgb[None])[0] * 2 - 1, rgb * 2 - 1


def colours(oracle, tokens, gray):
    """Tokens (B, K, 256) + gray images (B, 3, S, S) -> the oracle's colourings (B, K, 3, S, S) in [0, 1]."""
    B, K, _ = tokens.shape
    out = vqvae.decode(oracle, tokens.flatten(0, 1) - 1, gray.repeat_interleave(K, 0))
    return ((out.clamp(-1, 1) + 1) / 2).view(B, K, *out.shape[1:])


# ---- rewards: colorfulness (the paper's), vivid_coherent (ours), on the decoded images -------------------------------
def hue_bin(a, b, bins=7):
    """Lab a, b (any shape) -> hue bin in 0..bins-1: atan2(b, a) in `bins` equal bins over (-pi, pi]
    (a pixel with chroma <= 1e-3 gets hue 0: atan2(0, 0) = 0, not rounding noise)."""
    hue = torch.where((a ** 2 + b ** 2).sqrt() > 1e-3, torch.atan2(b, a), 0.0)
    hue = torch.where(hue <= -math.pi, math.pi, hue)  # atan2 gives -pi for b = -0.0: the interval is (-pi, pi]
    return (torch.ceil((hue + math.pi) / (2 * math.pi / bins)) - 1).clamp(0, bins - 1).long()


def colorfulness(images, min_chroma=10.0, bins=7):
    """(N, 3, H, W) sRGB in [0, 1] -> (score, vivid_fraction, hue_entropy), each (N,).
    vivid = fraction of pixels with Lab chroma sqrt(a^2 + b^2) > 10; hue = atan2(b, a) of every pixel in 7
    equal bins over (-pi, pi] (neutral pixels: hue 0); entropy in nats (0 log 0 = 0, at most ln 7);
    score = vivid x entropy.
    The vivid term is flat above the threshold, so it does not pay for ever more saturated colours."""
    _, a, b = srgb_to_lab(images.float())
    vivid = ((a ** 2 + b ** 2).sqrt() > min_chroma).float().mean((1, 2))
    hist = F.one_hot(hue_bin(a, b, bins).flatten(1), bins).float().mean(1)  # (N, bins)
    entropy = -(hist * hist.clamp(min=1e-12).log()).sum(1)
    return vivid * entropy, vivid, entropy


def colour_labels(images, min_chroma=10.0, bins=7):
    """(N, 3, H, W) sRGB in [0, 1] -> (N, H, W) long: the pixel's hue bin (colorfulness's) if its chroma is
    > 10, else `bins` (neutral: gray, white, black and faint tints are one label whatever their hue)."""
    _, a, b = srgb_to_lab(images.float())
    return torch.where((a ** 2 + b ** 2).sqrt() > min_chroma, hue_bin(a, b, bins), bins)


def reward_colorfulness(pred, batch):
    """r = vivid fraction x hue entropy of each decoded colouring. pred (B, K, 3, H, W) in [0, 1] -> r (B, K)."""
    B, K = pred.shape[:2]
    score, vivid, entropy = colorfulness(pred.flatten(0, 1))
    return score.view(B, K), dict(vivid=vivid.mean(), hue_entropy=entropy.mean())


def reward_vivid_coherent(pred, batch, edge=0.05, power=2):
    """r = colorfulness x agreement^2, agreement = |{flat pairs with one label}| / |{flat pairs}| (1 if none):
    over the pairs of a pixel and the pixel one code to its right or below (gap H / 16 px: the LM writes 16 x 16
    codes, and the pixels inside one code agree whatever the code), a label as in colour_labels (hue bin if chroma
    > 10, else neutral), a pair "flat" if the gray input differs by < 0.05 between them (|g(p) - g(q)|, g in [0, 1]).
    Colorfulness counts pixels, so confetti scores as well as coloured objects; agreement asks for one colour
    where the gray image shows no edge (an object's inside), and lets the colour change where it has one. It reads
    only the prediction and the gray input, so it works on photos too. 0.05: 98% of the synthetic world's pairs
    inside a segment are below it (pixel noise), 30% of the pairs across a boundary too (same L*: no edge). Squared:
    with agreement^1 colorfulness still wins and coherence falls, with ^3 hues and gamut suffer (probes/README.md).
    pred (B, K, 3, H, W) in [0, 1], batch["gray"] (B, C, H, W) in [0, 1] (every channel equal) -> r (B, K)."""
    B, K, _, H, W = pred.shape
    score, vivid, entropy = colorfulness(pred.flatten(0, 1))
    lab = colour_labels(pred.flatten(0, 1)).view(B, K, H, W)
    g, gap = batch["gray"][:, :1].float(), max(1, H // 16)  # g (B, 1, H, W): broadcasts over the K samples
    same, flat = [], []
    for d in (3, 2):  # pairs along rows, then along columns
        n = lab.shape[d] - gap
        same.append((lab.narrow(d, 0, n) == lab.narrow(d, gap, n)).flatten(2))  # (B, K, pairs)
        flat.append(((g.narrow(d, 0, n) - g.narrow(d, gap, n)).abs() < edge).flatten(2))  # (B, 1, pairs)
    same, flat = torch.cat(same, 2), torch.cat(flat, 2).float()
    n_flat = flat.sum(2)  # (B, 1)
    agree = torch.where(n_flat > 0, (same * flat).sum(2) / n_flat.clamp(min=1), 1.0)  # (B, K)
    return score.view(B, K) * agree ** power, dict(vivid=vivid.mean(), hue_entropy=entropy.mean(),
                                                   colorfulness=score.mean(), agreement=agree.mean())


REWARDS = {"colorfulness": reward_colorfulness, "vivid_coherent": reward_vivid_coherent}

# ---- metric: colorfulness and both terms, coherence, PSNR to the true colours, the saturation-hacking indicator -----
def coherence(images, segments, min_chroma=10.0, bins=7):
    """Do the colourings keep each ground-truth segment in one colour? (N, 3, H, W) sRGB in [0, 1], segments
    (N, H, W) integer ids (0 = void, not counted) -> (N,):
        coherence = 1/|S| sum_{s in S} max_l |{p in s : label(p) = l}| / |s|
    over the segments S of an image (every thing and stuff region), label(p) = p's hue bin (colorfulness's 7) if
    its chroma > 10, else neutral. The mean over segments, not pixels: a small object counts as much as the sky.
    One colour per segment gives 1, confetti of L equally common labels about 1/L. (No segment at all: 0.)"""
    lab = colour_labels(images, min_chroma, bins).flatten(1)  # (N, H W) in 0..bins
    seg = segments.to(lab.device).long().flatten(1)
    N, M, L = seg.shape[0], int(seg.max()) + 1, bins + 1
    ones = torch.ones_like(lab, dtype=torch.float)
    counts = torch.zeros(N, M * L, device=lab.device).scatter_add_(1, seg * L + lab, ones).view(N, M, L)  # pixels
    size = counts.sum(2)
    real = (size > 0) & (torch.arange(M, device=lab.device) > 0)  # (N, M): present, not void
    share = counts.max(2).values / size.clamp(min=1)
    return (share * real).sum(1) / real.sum(1).clamp(min=1)


def distinct(images, segments, things, ring=3, min_chroma=10.0, bins=7):
    """Does each object stand out in its own colour? (N, 3, H, W) sRGB in [0, 1], segments (N, H, W) ids, things
    (N, T) the things' ids (0: padding) -> (N,): the share of an image's things t whose majority label differs
    from the majority label of the pixels within `ring` px outside t (its surroundings: other segments, the ground),
        distinct = 1/|T| sum_{t in T} [argmax_l |{p in t : label(p) = l}| != argmax_l |{p in ring(t) : label(p) = l}|]
    labels as in coherence. One colour over object and ground scores 0 however coherent; a vivid object on a muted
    ground 1. Things with no visible pixel are skipped (an image without any: nan, left out of the mean)."""
    lab = F.one_hot(colour_labels(images, min_chroma, bins), bins + 1).flatten(1, 2).float()  # (N, H W, L)
    seg, things = segments.to(lab.device).long(), things.to(lab.device).long()
    inside = (seg[:, None] == things[:, :, None, None]) & (things[:, :, None, None] > 0)  # (N, T, H, W)
    near = (F.max_pool2d(inside.float(), 2 * ring + 1, 1, ring) > 0) & ~inside
    a, b = inside.flatten(2).float() @ lab, near.flatten(2).float() @ lab  # (N, T, L) label counts in and around
    real = inside.flatten(2).any(2)
    return ((a.argmax(2) != b.argmax(2)) & real).sum(1) / real.sum(1)  # 0 / 0: nan


def gamut_edge(images):
    """(N, 3, H, W) in [0, 1] -> (N,) fraction of pixels with a channel at 0 or 255 (8 bits): colours pushed
    out of the sRGB gamut end there (clipped), so a model that hacks saturation raises it."""
    q = (images * 255).round()
    return ((q <= 0) | (q >= 255)).any(1).float().mean((1, 2))


def psnr(images, truth):
    """Per image, in [-1, 1] units (dynamic range 2, as UViM's evaluator): 10 log10(4 / MSE). (N,)"""
    mse = ((images * 2 - 1) - (truth * 2 - 1)).pow(2).mean((1, 2, 3))
    return 10 * torch.log10(4 / mse.clamp(min=1e-10))


def image_metrics(images, truth, segments=None):  # segments: (maps, things) or None (photos: both unknown)
    score, vivid, entropy = colorfulness(images)
    return dict(colorfulness=score, vivid=vivid, hue_entropy=entropy,
                coherence=None if segments is None else coherence(images, segments[0]),
                distinct=None if segments is None else distinct(images, *segments), psnr=psnr(images, truth),
                gamut_edge=gamut_edge(images))


def segment_maps(ds, n):
    """The first n held-out items' panoptic maps (n, S, S) and thing ids (n, T; 0 pads), or None (photos)."""
    items = [ds.items[i] for i in range(n)]
    if any(it.get("panoptic") is None for it in items):
        return None
    things = torch.zeros(n, max(1, *(len(it["things"]) for it in items)), dtype=torch.long)
    for i, it in enumerate(items):
        things[i, :len(it["things"])] = torch.tensor(it["things"], dtype=torch.long)
    return torch.from_numpy(np.stack([it["panoptic"] for it in items])), things


@torch.no_grad()
def predict(model, oracle, ds, device, n_images, temperature, top_p, seed, micro_batch=0):  # 0: 50
    """Colourings of the first n_images (N, 3, S, S) in [0, 1], with the true colours; sampling noise is a
    function of (seed, image index) only, so every model is evaluated on the same draws."""
    model.eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(min(n_images, len(ds)))),
                                         batch_size=micro_batch or 50)
    out, truth = [], []
    allowed = vqvae.allowed_tokens(model.cfg["vocab"] - 1, device)
    for idx, gray, rgb in tqdm(loader, desc="eval", leave=False):  # rank 0 only
        gray = gray.to(device)
        noise = common.example_noise(seed, 0, idx, 1, 256)
        with common.autocast(device):
            tok, _ = common.sample(model, gray, 256, 1, temperature, top_p=top_p, noise=noise, allowed=allowed)
        out.append(colours(oracle, tok, gray)[:, 0].float().cpu())
        truth.append((rgb + 1) / 2)
    model.train()
    return torch.cat(out), torch.cat(truth)


def summarize(m):  # per-image metrics -> their means (None stays None: "n/a")
    return {k: None if v is None else float(v.float().nanmean()) for k, v in m.items()}


# ---- stages ----------------------------------------------------------------------------------------------------------
def setup(args):
    rank, world, device = common.ddp_setup()
    torch.manual_seed(args.seed)
    path = args.oracle or os.path.join(args.out_dir, "vqvae_colorize", "ckpt.pt")
    oracle = vqvae.load(path, "colorize", device, None if args.oracle else args)  # of this run's flags?
    args.image_size = oracle.c["image_size"]
    tr, va = load_data(args)
    return rank, world, device, oracle, path, Photos(tr, args.image_size), Photos(va, args.image_size)


def train_oracle(args):
    """--stage oracle: UViM's stage I (vqvae.train) on these images, with the oracle's preset (vqvae.PRESETS) and
    --oracle_flags. Loss: squared error of the colours (UViM's); report: PSNR, colorfulness of its reconstructions."""
    oa = vqvae.oracle_args(args, "colorize")
    if args.stage == "all" and vqvae.trained(oa):
        return
    common.ddp_setup()  # the loaders print on rank 0 only
    tr, va = (Photos(x, oa.image_size) for x in load_data(oa))

    def report(oracle, batches):  # batches: (gray, true colours, codes (B, 256)) of held-out images, in [-1, 1]
        rows = []  # per image: PSNR of the reconstruction, its colorfulness, the truth's
        for gray, rgb, codes in batches:
            rec, truth = (vqvae.decode(oracle, codes, gray).clamp(-1, 1) + 1) / 2, (rgb + 1) / 2
            rows.append(torch.stack([psnr(rec, truth), colorfulness(rec)[0], colorfulness(truth)[0]], 1).cpu())
        m = torch.cat(rows).mean(0).tolist()
        line = f"images: PSNR {m[0]:.2f} dB, colorfulness {m[1]:.3f} (truth {m[2]:.3f})"
        return dict(psnr=m[0], colorfulness=m[1], truth_colorfulness=m[2]), line

    vqvae.train(oa, tr, va, dict(out_chans=3, classes=0, categories=[]), lambda logits, rgb: F.mse_loss(logits, rgb),
                report)


def pretrain_encoder(args):
    """--stage encoder: the ViT alone learns every pixel's class from the gray synthetic training scenes."""
    if args.data != "synthetic":
        raise UserError("--stage encoder trains on the synthetic world; on photos pass --init_encoder (a timm ViT)")
    rank, world, device, *_ = setup(args)
    gray = lambda img: (to_gray(torch.from_numpy(img).permute(2, 0, 1)[None] / 255)[0] * 255).round()  # noqa: E731
    scenes = [dict(s, image=gray(s["image"]).byte().permute(1, 2, 0).numpy())  # the ViT's input: (S, S, 3) uint8
              for s in common.synthetic_world("train", args.num_train, args.image_size, args.seed)]
    cfg = common.model_config(args.model, args.image_size, 1, 1, 0, 0, args.patch)  # only its ViT part is used
    common.pretrain_encoder(args, "colorize", cfg, scenes, device, rank, world)


def train(args, stage):
    """mle / mle_cont / reward: one loop, the step differs. MLE: teacher-forced CE on the oracle's codes of
    the true colours. Reward: sample K code sequences, decode them with the oracle, score each (--reward: it gets
    the gray input too), REINFORCE with the leave-one-out baseline."""
    init = args.init or (os.path.join(args.out_dir, "colorize", "mle", "ckpt.pt") if stage != "mle" else "")
    ck = common.load_ckpt(init, "colorize") if init else None
    rank, world, device, oracle, oracle_path, tr, va = setup(args)
    V, L, master = oracle.c["codebook"] + 1, 256, rank == 0
    meta = dict(oracle=oracle_path, oracle_id=oracle.fingerprint, reward=args.reward)
    if ck:  # prior: training steps behind the starting point
        meta = dict(ck["meta"], prior=ck["meta"].get("prior", 0) + ck["step"])
        cfg, state = ck["config"], ck["model"]
    else:
        cfg, state = common.model_config(args.model, args.image_size, V, L, 0, args.dec_layers, args.patch), None
    raw, model, opt, start, path, meta = common.stage_setup("colorize", stage, args, cfg, meta, device, world, state)
    vqvae.check_lm(raw.cfg, meta, oracle, path if start else init)  # its codes must mean what this oracle's do
    if not ck and start == 0:
        common.init_encoder(raw, args, "colorize")
    allowed = vqvae.allowed_tokens(V - 1, device)
    log = common.Logger(os.path.dirname(path), master, resume=start)
    common.print0(f"{stage}: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params, {len(tr)} train "
                  f"images, {V - 1} codes, steps {start}->{args.steps}, global batch {args.batch_size} on {world} "
                  f"process(es)")
    sampler = common.StepSampler(len(tr), args.batch_size, args.seed, start, args.steps, rank, world)
    loader = torch.utils.data.DataLoader(tr, batch_sampler=sampler, num_workers=args.workers)
    b, t0 = args.batch_size // world, time.time()
    mb = args.micro_batch or b
    for step, (idx, gray, rgb) in enumerate(tqdm(loader, disable=not master, initial=start, total=args.steps,
                                                 desc=stage), start):
        common.set_lr(opt, step, args.lr, args.warmup, args.steps, args.schedule)
        pos = torch.arange(rank * b, (rank + 1) * b)  # global position of each example in the batch
        gray, rgb = gray.to(device), rgb.to(device)

        def mle_micro(s):
            tok = vqvae.encode(oracle, rgb[s], gray[s]) + 1  # (b, 256)
            with common.autocast(device):
                loss, _, st = common.mle_loss(model, gray[s], tok, torch.ones_like(tok, dtype=torch.float), allowed)
            return loss, st

        def reward_micro(s):
            noise = common.example_noise(args.seed, step, pos[s], args.samples, L)
            with common.autocast(device):
                tok, _ = common.sample(raw, gray[s], L, args.samples, args.temperature, top_p=args.top_p, noise=noise,
                                       allowed=allowed)
            r, aux = REWARDS[args.reward](colours(oracle, tok, gray[s]), dict(gray=(gray[s] + 1) / 2))  # [0, 1]
            with common.autocast(device):
                loss, _, _, _, st = common.reinforce_loss(model, gray[s], tok, r,
                                                          torch.ones_like(tok, dtype=torch.bool),
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
            common.save_stage(path, "colorize", raw, opt, step + 1, args, meta)
        if master and ((args.eval_every and (step + 1) % args.eval_every == 0) or done):
            pred, truth = predict(raw, oracle, va, device, args.eval_images, args.eval_temperature, args.top_p,
                                  args.seed, args.micro_batch)
            m = summarize(image_metrics(pred, truth, segment_maps(va, len(pred))))
            log(step + 1, **{f"val_{k}": v for k, v in m.items() if v is not None})
    log(args.steps, quiet=True, replica_checksums=common.replica_checksums(raw))  # DDP kept ranks in sync?
    common.ddp_end_stage()


def to_pil(x):  # (3, S, S) in [0, 1] -> PIL
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def evaluate(args):
    """Every checkpoint that exists, side by side with the truth and the oracle's reconstruction:
    metrics.json, table.md, the colourings as PNGs, a grid (gray / truth / each model)."""
    cks = common.eval_checkpoints(args.out_dir, "colorize")  # {name: (path, ckpt)}: mle and its two tunings
    rank, world, device, oracle, _, tr, va = setup(args)
    for path, ck in cks.values():
        vqvae.check_lm(ck["config"], ck["meta"], oracle, path)
    common.ddp_end_stage()  # no collective below: rank 0 evaluates alone
    if rank:
        return
    out = os.path.join(args.out_dir, "colorize", "eval")
    n = min(args.eval_images, len(va))
    imgs, steps = {}, {}
    for name, (path, ck) in cks.items():
        model = common.build_model(ck["config"], device, ck["model"], path, args.image_size)
        imgs[name], truth = predict(model, oracle, va, device, n, args.eval_temperature, args.top_p, args.seed,
                                        args.micro_batch)
        prior = ck["meta"].get("prior", 0)  # e.g. reward: "1500+300" = MLE steps + this stage's
        steps[name] = f"{prior}+{ck['step']}" if prior else str(ck["step"])
    with torch.no_grad():  # the oracle's own reconstruction: the ceiling of any code sequence
        recon = []
        for _, gray, rgb in torch.utils.data.DataLoader(torch.utils.data.Subset(va, range(n)), batch_size=50):
            gray, rgb = gray.to(device), rgb.to(device)
            recon.append(colours(oracle, vqvae.encode(oracle, rgb, gray)[:, None] + 1, gray)[:, 0].cpu())
    rows = {"truth": (truth, "-"), "oracle": (torch.cat(recon), "-"), **{k: (v, steps[k]) for k, v in imgs.items()}}
    segs = segment_maps(va, n)  # None on photos: coherence "n/a"
    metrics = {name: dict(summarize(image_metrics(x, truth, segs)), steps=s) for name, (x, s) in rows.items()}
    for name, (x, _) in rows.items():  # the colourings, as PNGs
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for i in range(n):
            to_pil(x[i]).save(os.path.join(out, name, f"{i:04d}.png"))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    table = ["| colours | steps | colorfulness | vivid | hue entropy | coherence | objects distinct | PSNR | "
             "gamut edge |", "|---" * 9 + "|"]
    table += [f"| {k} | {m['steps']} | {m['colorfulness']:.3f} | {m['vivid']:.3f} | {m['hue_entropy']:.3f} | "
              + "".join("n/a | " if m[c] is None else f"{m[c]:.3f} | " for c in ("coherence", "distinct")) +
              f"{'-' if k == 'truth' else format(m['psnr'], '.2f')} | {m['gamut_edge']:.4f} |"
              for k, m in metrics.items()]
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"held-out {n} images, eval temperature {args.eval_temperature}, top_p {args.top_p}\n\n"
                + "\n".join(table) + "\n")
    print("\n".join(table))
    gray = torch.stack([(va[i][1] + 1) / 2 for i in range(min(8, n))])
    grid = [[to_pil(gray[i])] + [to_pil(rows[k][0][i]) for k in ["truth"] + list(imgs)] for i in range(len(gray))]
    common.save_grid(grid, ["gray", "truth"] + list(imgs), os.path.join(out, "grid.png"))
    print(f"wrote {out}/metrics.json, table.md, <colours>/*.png, grid.png")


def main():
    args = p.parse_args()
    preset = dict(PRESETS[args.data], **(TINY if args.tiny else {}))
    if (args.data == "folder") != bool(args.data_dir):  # --data_dir alone would silently train on the synthetic world
        raise UserError("--data folder needs --data_dir, and --data_dir needs --data folder")
    for k in ["model", "patch", "dec_layers", "batch_size", "samples", "enc_lr_mult", "eval_images", "num_train",
              "num_val", "top_p"]:
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    if not 0 < args.top_p <= 1 or args.eval_temperature < 0:  # else a garbage or degenerate sampler, silently
        raise UserError(f"--top_p {args.top_p}, --eval_temperature {args.eval_temperature}: need 0 < p <= 1, T >= 0")
    stages = ["oracle", "encoder", "mle", "reward", "mle_cont", "eval"] if args.stage == "all" else [args.stage]
    if args.stage == "all" and args.oracle:  # stage I is that checkpoint
        stages.remove("oracle")
    if args.stage == "all" and (args.data != "synthetic" or args.init_encoder):  # a pretrained ViT instead
        stages.remove("encoder")
    given = dict(steps=args.steps, lr=args.lr, warmup=args.warmup, wd=args.wd)
    for stage in stages:
        common.stage_flags(args, preset, stage, given, "colorize", REWARDS)  # mle_cont: the reward stage's lr, steps
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
