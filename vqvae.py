"""UViM stage I: the VQ-VAE "oracle" that turns a task output into 256 discrete codes (Kolesnikov et al. 2022),
a library for panoptic.py and colorize.py (their `--stage oracle` calls `train`; this file imports neither).

A ViT autoencoder over the task output with the image as context, added to the inputs of both its encoder
and decoder (so the codes only carry what the image does not tell). Bottleneck: a 16 x 16 grid = 256 codes
(on a coarser token grid each token writes and reads its r x r codes as one vector: all 256 carry information);
cosine VQ (standardized vectors, unit-norm codewords, straight-through) with an EMA codebook whose dead codes
are restarted by splitting the most used one; code dropout while training. Two departures from UViM in the
synthetic presets (results/panoptic/probes/README.md): the head's logits also read per-pixel colour features of
the image (`--pixel`; panoptic's 8 x 8 patches are an eighth of the image), so masks follow its edges; the encoder has
no attention or position (`--local`): a code describes its own patch only, to keep stage II's task local. The colour
oracle's 4 x 4 patches make one code per token, so an object's colour is not blurred into its ground by a shared
token (results/colorize/probes/coherence/distinct/).

    python panoptic.py --stage oracle   # train the oracle on the synthetic world, report its PQ and code usage
    python colorize.py --stage oracle   # the colour oracle (gray image as context), report its PSNR
    python colorize.py --stage oracle --data folder --data_dir ~/photos --oracle_flags "--steps 4000"
    python vqvae.py --task panoptic --tiny   # the old command: runs `python panoptic.py --stage oracle --tiny`

The flags below (`python vqvae.py --help`) are the oracle's, with a preset per data source and task; the task
scripts pass their shared ones (SHARED) and `--oracle_flags "<any of the others>"`. Outputs (UViM): panoptic =
per pixel one-hot class (0 void) + one-hot instance slot (segments 1..N in raster order of their centre of mass),
cross-entropy; colour = RGB in [-1, 1] given the gray image, squared error; the task script passes its datasets,
loss and report (PQ, PSNR). panoptic.py and colorize.py then use `load(path, task, device)`, `encode(model,
target, image) -> codes (B, 256)`, `decode`, `check_lm`.
"""
import argparse
import functools
import hashlib
import json
import os
import shlex
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import common
from common import UserError

# -----------------------------------------------------------------------------
# config

PRESETS = {  # "<data>/<task>"
    "synthetic/panoptic": dict(image_size=64, patch=8, width=128, depth=3, heads=4, codebook=256, code_dim=32,
                               instances=16, batch_size=32, steps=2000, lr=1e-3, warmup=100, eval_images=500,
                               num_train=10000, num_val=500, local=True, pixel=16),
    "synthetic/colorize": dict(image_size=64, patch=4, width=128, depth=3, heads=4, codebook=256, code_dim=32,
                               instances=0, batch_size=32, steps=600, lr=1e-3, warmup=100, eval_images=300,
                               num_train=10000, num_val=300, local=True, pixel=16),
    # UViM's COCO oracle: 512 px, patch 16 (32 x 32 tokens pooled to 16 x 16 codes), 4096 codes, 100 instances
    "coco/panoptic": dict(image_size=512, patch=16, width=768, depth=6, heads=12, codebook=4096, code_dim=32,
                          instances=100, batch_size=1024, steps=111500, lr=4e-4, warmup=4000, eval_images=5000,
                          num_train=0, num_val=0, local=False, pixel=0, micro_batch=16),
    # real photos (UViM's ImageNet oracle: 512 px, patch 16, ViT-B width, 4096 codes; here a CPU-sized start)
    "folder/colorize": dict(image_size=128, patch=8, width=256, depth=4, heads=8, codebook=1024, code_dim=32,
                            instances=0, batch_size=64, steps=20000, lr=4e-4, warmup=1000, eval_images=500,
                            num_train=0, num_val=500, local=False, pixel=0)}
TINY = dict(image_size=32, patch=2, width=64, depth=1, heads=4, codebook=64, batch_size=8, steps=30, warmup=5,
            eval_images=16, num_train=64, num_val=16, micro_batch=0)  # any --data: the tiny model and resolution
# flags the task scripts share with their oracle stage; every other flag comes through their --oracle_flags
SHARED = ("data", "data_dir", "train_split", "val_split", "out_dir", "seed", "resume", "tiny", "workers", "compile")

p = argparse.ArgumentParser("vqvae.py", description=__doc__, formatter_class=common.Help)
p.add_argument("--task", default="panoptic", choices=["panoptic", "colorize"],
               help="what the codes encode; this command runs `python <task>.py --stage oracle` with these flags")
p.add_argument("--data", default="synthetic", choices=["synthetic", "folder", "coco"],
               help="data source: the synthetic world, a folder of photos (colorize), COCO panoptic (panoptic)")
p.add_argument("--data_dir", default="", help="the folder of photos, or the COCO root (see panoptic.py)")
p.add_argument("--train_split", default="train2017", help="COCO training split name")
p.add_argument("--val_split", default="val2017", help="COCO held-out split name")
p.add_argument("--out_dir", default="out", help="writes out_dir/vqvae_<task>/ckpt.pt, log.jsonl, eval.json")
p.add_argument("--image_size", type=int, default=None, help="square resolution of image and output (preset)")
p.add_argument("--patch", type=int, default=None, help="ViT patch (preset; 8 x 8 tokens own 2 x 2 codes each)")
p.add_argument("--width", type=int, default=None, help="transformer width (UViM: 768; preset)")
p.add_argument("--depth", type=int, default=None, help="encoder depth; the decoder has twice as many blocks (preset)")
p.add_argument("--heads", type=int, default=None, help="attention heads (preset)")
p.add_argument("--codebook", type=int, default=None, help="number of codewords (COCO: 4096; preset)")
p.add_argument("--pixel", type=int, default=None, help="per-pixel colour features the head reads (0: off; preset)")
p.add_argument("--local", action=argparse.BooleanOptionalAction, default=None,
               help="encoder without attention or position: a code only describes its own patch (preset)")
p.add_argument("--code_dim", type=int, default=None, help="codeword dimension (preset)")
p.add_argument("--instances", type=int, default=None, help="instance slots of the panoptic output (COCO: 100; preset)")
p.add_argument("--batch_size", type=int, default=None, help="global batch (preset)")
p.add_argument("--micro_batch", type=int, default=None, help="gradient-accumulation micro-batch a process (0: whole; "
               "the codebook moves once per step either way; preset: COCO 16)")
p.add_argument("--steps", type=int, default=None, help="training steps (preset)")
p.add_argument("--lr", type=float, default=None, help="peak learning rate (cosine schedule; preset)")
p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (preset)")
p.add_argument("--wd", type=float, default=1e-4, help="decoupled weight decay")
p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"], help="optimizer")
p.add_argument("--clip", type=float, default=1.0, help="gradient clipping by global norm (0: off)")
p.add_argument("--code_dropout", action=argparse.BooleanOptionalAction, default=True,
               help="UViM: drop U(0,1) of codes (on by default)")
p.add_argument("--resume", action="store_true", help="continue from out_dir/vqvae_<task>/ckpt.pt")
p.add_argument("--compile", action="store_true", help="torch.compile the model")
p.add_argument("--seed", type=int, default=0, help="seed of init, data order and code dropout")
p.add_argument("--log_every", type=int, default=100, help="print a line every this many steps")
p.add_argument("--ckpt_every", type=int, default=500, help="checkpoint every this many steps")
p.add_argument("--eval_images", type=int, default=None, help="held-out images for the oracle's report (preset)")
p.add_argument("--num_train", type=int, default=None, help="synthetic training scenes (preset)")
p.add_argument("--num_val", type=int, default=None, help="held-out scenes, or photos of a folder (<= 10%%; preset)")
p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (folder)")
p.add_argument("--tiny", action="store_true", help="tiny model, data and steps (smoke test)")

# -----------------------------------------------------------------------------
# panoptic output <-> (semantics, instances) maps
def canonical(seg, segments):
    """Panoptic map (H, W) of segment ids + [{id, category_id: class}] -> semantics (H, W) = class (0 void),
    instances (H, W) = 1..N in raster order of each segment's centre of mass (y-major), 0 void."""
    sem, inst = np.zeros(seg.shape, np.int64), np.zeros(seg.shape, np.int64)
    keys = [(ys.mean() * seg.shape[1] + xs.mean(), s) for s in segments
            for ys, xs in [np.nonzero(seg == s["id"])] if len(ys)]
    for k, (_, s) in enumerate(sorted(keys, key=lambda t: t[0])):
        m = seg == s["id"]
        sem[m], inst[m] = s["category_id"], k + 1
    return sem, inst


def to_panoptic(sem_logits, inst_logits):
    """UViM decoding. (B, C, H, W), (B, I, H, W) -> segment index per pixel (B, H, W) (0 = void) and the
    class of each index (B, I) (-1 = none): argmax instance per pixel; each instance takes the class with
    the largest summed semantic logits over its pixels; class 0 (void) or instance 0 -> void."""
    inst = inst_logits.argmax(1)  # (B, H, W)
    B, I, C = inst.shape[0], inst_logits.shape[1], sem_logits.shape[1]
    pix = inst.flatten(1)  # sums per instance by scatter: no (B, I, H, W) one-hot (COCO: 100 x 512 x 512)
    summed = sem_logits.new_zeros(B, I, C, dtype=torch.float).scatter_add_(
        1, pix[:, :, None].expand(-1, -1, C), sem_logits.flatten(2).transpose(1, 2).float())  # (B, I, C)
    cat = summed.argmax(-1)
    present = torch.zeros(B, I, device=inst.device).scatter_add_(1, pix, torch.ones(pix.shape, device=inst.device)) > 0
    cat = torch.where(present & (cat > 0), cat, -1)
    cat[:, 0] = -1
    seg = torch.where(cat.gather(1, inst.flatten(1)).view_as(inst) >= 0, inst, 0)
    return seg, cat


# -----------------------------------------------------------------------------
# the model: ViT encoder -> 16 x 16 cosine VQ (EMA codebook) -> ViT decoder, image context on both sides
class VQVAE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c, d, p, g = c, c["width"], c["patch"], c["image_size"] // c["patch"]
        self.embed = nn.Conv2d(c["out_chans"], d, p, p)  # one-hot labels per patch -> width (a linear map)
        self.enc_ctx, self.dec_ctx = nn.Conv2d(3, d, p, p), nn.Conv2d(3, d, p, p)
        self.local = c.get("local", False)  # encoder without attention or position: a code describes its patch only
        self.enc_pos = None if self.local else nn.Parameter(torch.randn(1, g * g, d) / d ** 0.5)
        self.dec_pos = nn.Parameter(torch.randn(1, g * g, d) / d ** 0.5)
        self.enc = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                 if self.local else common.Block(d, c["heads"]) for _ in range(c["depth"]))
        self.dec = nn.ModuleList(common.Block(d, c["heads"]) for _ in range(2 * c["depth"]))
        self.enc_ln, self.dec_ln = nn.LayerNorm(d), nn.LayerNorm(d)
        if (16 % g if g <= 16 else g % 16):
            raise UserError(f"a {g} x {g} token grid (image_size / patch) does not tile the 16 x 16 codes")
        self.g, self.r = g, max(1, 16 // g)  # a token owns r x r codes (g <= 16), or g/16 x g/16 tokens share one
        self.to_code = nn.Linear(d, c["code_dim"] * self.r ** 2)
        self.from_code = nn.Linear(c["code_dim"] * self.r ** 2, d)
        self.head = nn.Linear(d, p * p * c["out_chans"])
        nn.init.zeros_(self.head.weight)  # UViM: zero-initialized output head
        if h := c.get("pixel", 0):  # per-pixel colour features (B, h, H, W); each token maps them to its logits
            self.pix = nn.Sequential(nn.Conv2d(3, h, 1), nn.GELU(), nn.Conv2d(h, h, 1))
            self.pix_head = nn.Linear(d, h * c["out_chans"])
            nn.init.zeros_(self.pix_head.weight)
        # the codebook is state, not trained by gradients: running sums and counts (EMA)
        self.register_buffer("sums", torch.randn(c["codebook"], c["code_dim"]) / c["codebook"] ** 0.5)
        self.register_buffer("counts", torch.ones(c["codebook"]))
        self.gen = torch.Generator().manual_seed(0)  # dead-code restart noise: the same on every rank, checkpointed

    def codes_of(self, x):  # tokens (B, g*g, D) -> (B, 256, code_dim); g <= 16: each code its own vector
        x = rearrange(x, "b (h w) d -> b d h w", h=self.g)  # the token grid
        x = F.avg_pool2d(x, self.g // 16) if self.g > 16 else x  # a finer grid: g/16 x g/16 tokens per code
        z = self.to_code(rearrange(x, "b d h w -> b h w d"))  # (B, 16 / r, 16 / r, code_dim * r * r)
        return rearrange(z, "b h w (c i j) -> b (h i w j) c", i=self.r, j=self.r)  # its r x r codes, raster order

    def tokens_of(self, q):  # (B, 256, code_dim) -> (B, g*g, D): the inverse layout
        x = rearrange(q, "b (h i w j) c -> b h w (c i j)", h=16 // self.r, i=self.r, j=self.r)  # r x r codes a token
        x = rearrange(self.from_code(x), "b h w d -> b d h w")  # (B, D, 16 / r, 16 / r)
        x = F.interpolate(x, scale_factor=self.g // 16) if self.g > 16 else x
        return rearrange(x, "b d h w -> b (h w) d")

    def encode_z(self, target, image):  # -> standardized pre-quantized vectors (B, 256, code_dim)
        if not target.is_floating_point():  # panoptic ids (B, 2, H, W) -> one-hot classes + slots (B, C + I, H, W),
            C, I = self.c["classes"], self.c["instances"]  # floats made here, on the device: 245 MB per COCO image
            idx = torch.stack([target[:, 0], target[:, 1] + C], 1)  # (B, 2, H, W): the pixel's class, C + its slot
            # scattered, not F.one_hot: that is int64 (B, H, W, C + I), then a permuted copy (~1 GB a COCO image)
            target = torch.zeros(len(idx), C + I, *idx.shape[2:], device=idx.device).scatter_(1, idx, 1.0)
        x = rearrange(self.embed(target.float()) + self.enc_ctx(image), "b d h w -> b (h w) d")  # (B, g*g, D)
        x = x if self.local else x + self.enc_pos
        for b in self.enc:
            x = x + b(x) if self.local else b(x)
        z = self.codes_of(self.enc_ln(x)).float()  # standardized and quantized in fp32, also under autocast
        return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-6)

    def codewords(self):
        return F.normalize(self.sums / self.counts[:, None], dim=-1)

    def quantize(self, z):  # nearest codeword by cosine similarity -> codes (B, 256)
        with torch.autocast(z.device.type, enabled=False):  # bf16 (3 digits) would tie near codewords: the codes
            return (F.normalize(z, dim=-1) @ self.codewords().T).argmax(-1)  # of training = encode()'s

    def decode_codes(self, q, image):  # q (B, 256, code_dim) code vectors -> logits (B, out_chans, H, W)
        g, p = self.g, self.c["patch"]
        x = self.tokens_of(q) + rearrange(self.dec_ctx(image), "b d h w -> b (h w) d") + self.dec_pos
        for b in self.dec:
            x = b(x)
        x = self.dec_ln(x)
        y = rearrange(self.head(x), "b (h w) (c i j) -> b h w c i j", h=g, i=p, j=p)  # each token's p x p pixels
        if self.c.get("pixel", 0):
            f = rearrange(self.pix(image), "b k (h i) (w j) -> b h w k i j", i=p, j=p)  # (B, g, g, k, p, p)
            m = rearrange(self.pix_head(x), "b (h w) (c k) -> b h w c k", h=g, k=f.shape[3])  # (B, g, g, C, k)
            y = y + torch.einsum("bijhyx,bijch->bijcyx", f, m)
        return rearrange(y, "b h w c i j -> b c (h i) (w j)")

    def forward(self, target, image, drop=None):
        """Training pass: straight-through quantization, code dropout -> logits, codes, z (train() moves the codebook
        by every micro-batch's codes and z at once, after the step)."""
        z = self.encode_z(target, image)
        codes = self.quantize(z)
        q = z + (self.codewords()[codes] - z).detach()  # forward: the unit codeword; backward: to z
        if self.training and drop is not None:  # UViM code dropout: keep (1 - u) of the codes: u (B, 1), U (B, 256)
            q = q * (drop[1].to(z.device) >= drop[0].to(z.device))[..., None]
        return self.decode_codes(q, image), codes, z.detach()

    @torch.no_grad()
    def ema_update(self, z, codes, decay=0.995, min_count=0.1):  # -> codewords the global batch used
        onehot = F.one_hot(codes.flatten(), self.c["codebook"]).to(z.dtype)  # (B*256, K)
        counts, sums = onehot.sum(0), onehot.T @ z.flatten(0, 1)
        if dist.is_initialized():  # global batch statistics: every rank keeps the same codebook
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.counts.mul_(decay).add_(counts)
        self.sums.mul_(decay).add_(sums)
        for _ in range(self.c["codebook"]):  # dead codes: split the most used codeword into two
            lo, hi = int(self.counts.argmin()), int(self.counts.argmax())
            if self.counts[lo] >= min_count:
                break
            noise = torch.empty(self.sums.shape[1]).uniform_(0.999, 1.001, generator=self.gen).to(self.sums.device)
            self.sums[hi] /= 2  # (exact: a power of two)
            self.sums[lo] = self.sums[hi] * noise
            self.counts[lo] = self.counts[hi] = self.counts[hi] / 2
        return int((counts > 0).sum())


def allowed_tokens(codebook, device):
    """Stage II's vocabulary mask (256, codebook + 1): any code anywhere, never BOS (0 would decode as code -1)."""
    return (torch.arange(codebook + 1, device=device) > 0).repeat(256, 1)


def encode(model, target, image):
    """Frozen oracle: task output (colours (B, 3, H, W) or panoptic ids (B, 2, H, W)) + image -> codes (B, 256)."""
    with torch.no_grad():
        return model.quantize(model.encode_z(target, image))


def decode(model, codes, image):
    """Codes (B, 256) + image -> output logits (B, C, H, W)."""
    with torch.no_grad():
        return model.decode_codes(model.codewords()[codes], image)


def load(path, task, device, task_args=None):
    """A trained oracle, frozen, for stage II (panoptic.py / colorize.py). task_args: the task script's flags when
    the oracle is its run's own (out_dir/vqvae_<task>/, no --oracle): a --tiny run's oracle is not a preset run's
    (its image size would silently become the run's)."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no oracle; train it first: python {task}.py --stage oracle")
    ck = common.load_ckpt(path, f"vqvae_{task}")
    if task_args is not None and bool(ck["args"].get("tiny")) != task_args.tiny:
        raise UserError(f"{path}: the oracle of a{' --tiny' if ck['args'].get('tiny') else ' full-size'} run, this "
                        f"one is{'' if task_args.tiny else ' not'} --tiny: --stage oracle retrains it (or --out_dir)")
    model = VQVAE(ck["config"])
    model.load_state_dict(ck["model"])
    model.fingerprint = hashlib.sha1(ck["model"]["sums"].numpy().tobytes()).hexdigest()[:12]  # in the LM's meta
    model.path = path
    return model.to(device).eval().requires_grad_(False)


def check_lm(config, meta, oracle, path):
    """An LM checkpoint (its config and meta) wrote this oracle's codes: another oracle's (retrained since, or of
    another --codebook) decode into other things. Checkpoints from before the fingerprint pass on the vocabulary."""
    if config["vocab"] != oracle.c["codebook"] + 1 or meta.get("oracle_id", oracle.fingerprint) != oracle.fingerprint:
        raise UserError(f"{path}: made with another oracle than {oracle.path} (retrained?)")


# -----------------------------------------------------------------------------
# the task scripts' --stage oracle: these flags and presets, their data, loss and report
def oracle_args(task_args, task):
    """The oracle stage's flags: --oracle_flags parsed by this file's parser, the task script's SHARED flags, then
    the preset of --data / task (and TINY) for whatever is still unset."""
    try:
        flags = shlex.split(task_args.oracle_flags)
    except ValueError as e:  # an unclosed quote
        raise UserError(f"--oracle_flags {task_args.oracle_flags!r}: {e}")
    args, unknown = p.parse_known_args(flags)  # a bad value: argparse's one line, under vqvae.py's usage
    if unknown:
        raise UserError(f"--oracle_flags: {' '.join(unknown)}: not a flag of vqvae.py (python vqvae.py --help)")
    if given := [k for k in SHARED if getattr(args, k) != p.get_default(k)]:
        raise UserError(f"--oracle_flags: pass --{given[0]} to {task}.py itself (its stages share it)")
    for k in SHARED:
        setattr(args, k, getattr(task_args, k, p.get_default(k)))  # colorize.py has no --train_split
    args.task, key = task, f"{args.data}/{task}"
    if key not in PRESETS:
        raise UserError(f"{task}.py --data {args.data}: no oracle preset ({', '.join(PRESETS)})")
    for k, v in dict(PRESETS[key], **(TINY if args.tiny else {})).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    common.check_positive(args)  # the oracle's own (--oracle_flags)
    if args.image_size % args.patch:
        raise UserError(f"--image_size {args.image_size} is not a multiple of --patch {args.patch}")
    lm = str(getattr(task_args, "model", "")).partition("/")[2]  # stage II's ViT reads the images at this size:
    lm = int(lm) if lm.isdigit() else getattr(task_args, "patch", None)  # refused here, not after stage I trained
    if lm and args.image_size % lm and getattr(task_args, "stage", "") == "all":  # --stage oracle: no stage II yet
        raise UserError(f"stage II's ViT patch {lm} (--patch / --model) does not divide the oracle's image size "
                        f"{args.image_size} (--oracle_flags --image_size)")
    sizes = ("width", "depth", "heads", "codebook", "code_dim") + ("instances",) * (task == "panoptic")  # colorize: 0
    if bad := [f"--{k} {getattr(args, k)}" for k in sizes if getattr(args, k) <= 0]:
        raise UserError(f"--oracle_flags: {', '.join(bad)}: must be > 0")
    if args.pixel < 0 or args.width % args.heads:  # each head gets width / heads features
        raise UserError(f"--oracle_flags: need --pixel >= 0 (got {args.pixel}) and --heads dividing --width (got "
                        f"{args.heads}, {args.width})")
    return args


def trained(args):
    """--stage all: True if out_dir/vqvae_<task>/ckpt.pt is an oracle of these flags that finished (reused, one
    line); False if there is none or it was stopped early (trained: --resume continues it). Other flags: one line."""
    path = os.path.join(args.out_dir, f"vqvae_{args.task}", "ckpt.pt")
    if not os.path.exists(path):
        return False
    ck = common.load_ckpt(path, f"vqvae_{args.task}")
    ignored = ("task", "data_dir", "out_dir", "resume", "compile", "log_every", "ckpt_every", "eval_images", "workers",
               "micro_batch")  # the same run at any micro-batch
    if diff := [k for k, v in ck["args"].items() if k not in ignored and vars(args).get(k, v) != v]:
        raise UserError(f"{path}: an oracle of other flags {diff}: --stage oracle retrains it (or another --out_dir)")
    if ck["step"] < args.steps:
        return False
    common.print0(f"oracle: {path} exists, reused (--stage oracle retrains it)")
    return True


def train(args, tr, va, output, loss_fn, report):
    """Train the oracle, then report on held-out examples. tr, va: datasets of (index, context image (3, S, S) in
    [-1, 1], target, *extra) at args.image_size; output: the task output's dict(out_chans, classes (incl. void;
    0: none), categories) for the model config; loss_fn(logits, target, *extra) -> loss; report(model, batches) ->
    (metrics dict, line) where batches yields (context, target, codes (B, 256)) of va's first eval_images."""
    rank, world, device = common.ddp_setup()
    torch.manual_seed(args.seed)
    cfg = dict(image_size=args.image_size, patch=args.patch, width=args.width, depth=args.depth, heads=args.heads,
               codebook=args.codebook, code_dim=args.code_dim, out_chans=output["out_chans"],
               classes=output["classes"], instances=args.instances, categories=output["categories"],
               local=args.local, pixel=args.pixel)
    out = os.path.join(args.out_dir, f"vqvae_{args.task}")
    path, start = os.path.join(out, "ckpt.pt"), 0
    raw = VQVAE(cfg).to(device)
    opt = common.make_optimizer(raw, args.optimizer, args.lr, args.wd, 1.0)
    if args.resume and os.path.exists(path):
        ck = common.load_ckpt(path, f"vqvae_{args.task}")
        was, now = {**ck["args"], **ck["config"]}, {**vars(args), **cfg}  # else a shape error, or silently another run
        if diff := [k for k in (*cfg, "optimizer", "wd", "seed", "batch_size") if was.get(k) != now[k]]:
            raise UserError(f"{path}: made with other flags: {diff}")
        raw.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start = ck["step"]
        if "restart_gen" in ck:  # checkpoints before it was saved resume with a restarted noise stream
            raw.gen.set_state(ck["restart_gen"])
    model = torch.compile(raw) if args.compile else raw
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    log = common.Logger(out, rank == 0, resume=start)
    sampler = common.StepSampler(len(tr), args.batch_size, args.seed, start, args.steps, rank, world)
    b = args.batch_size // world
    if b % (mb := args.micro_batch or b):  # unequal parts: unequal weights (< 0: oracle_args)
        raise UserError(f"--micro_batch {mb}: must be 0 (whole) or divide the per-process batch {b}")
    loader = torch.utils.data.DataLoader(tr, batch_sampler=sampler, num_workers=args.workers)
    t0 = time.time()
    for step, (idx, ctx, target, *extra) in enumerate(tqdm(loader, disable=rank > 0, initial=start,
                                                           total=args.steps, desc="vqvae"), start):
        common.set_lr(opt, step, args.lr, args.warmup, args.steps, "cosine")
        ctx, target, extra = ctx.to(device), target.to(device), [e.to(device) for e in extra]
        drop = None
        if args.code_dropout:  # the global batch's draws, this rank's rows: N processes drop as 1 process does
            g = torch.Generator().manual_seed(args.seed * 7919 + step)
            drop = [torch.rand(b * world, n, generator=g)[rank * b:(rank + 1) * b] for n in (1, 256)]

        def micro(i):  # rows i:i+mb of this rank's batch (COCO: 245 MB of one-hot an image, and its activations)
            x = lambda t: t[i:i + mb]  # noqa: E731
            with common.autocast(device):
                logits, codes, z = model(x(target), x(ctx), drop and [x(d) for d in drop])
                seen.append((z, codes))
                return loss_fn(logits, x(target), *map(x, extra)), {}
        seen = []  # every micro-batch's (z, codes): the codebook moves once a step, on the whole batch
        stats = common.train_step(model, opt, args, [functools.partial(micro, i) for i in range(0, b, mb)], world)
        stats["used"] = raw.ema_update(*(torch.cat(v) for v in zip(*seen)))  # after the step: one codebook a step
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            log(step + 1, lr=opt.param_groups[0]["lr"], s_per_step=(time.time() - t0) / (step + 1 - start), **stats)
        if rank == 0 and ((step + 1) % args.ckpt_every == 0 or step + 1 == args.steps):
            common.save_ckpt(path, task=f"vqvae_{args.task}", model=raw.state_dict(), optimizer=opt.state_dict(),
                             step=step + 1, config=cfg, args=vars(args), restart_gen=raw.gen.get_state())
    if rank == 0:  # the oracle's own quality: the task's metric of its reconstructions, and the codewords used
        n, used = min(args.eval_images, len(va)), torch.zeros(args.codebook, dtype=torch.bool)

        def batches():
            for _, ctx, target, *_ in torch.utils.data.DataLoader(torch.utils.data.Subset(va, range(n)), 64):
                ctx, target = ctx.to(device), target.to(device)
                codes = encode(raw, target, ctx)
                used[codes.flatten().cpu()] = True
                yield ctx, target, codes
        raw.eval()
        with torch.no_grad():
            res, line = report(raw, batches())
        res["codes_used"] = int(used.sum())
        rec = {}  # {"All": {"pq": ...}, "psnr": ...} -> val_All_pq, val_psnr
        for k, v in res.items():
            rec.update({f"val_{k}_{m}": x for m, x in v.items()} if isinstance(v, dict) else {f"val_{k}": v})
        log(args.steps, **rec)
        print(f"oracle on {n} held-out {line}, {res['codes_used']} of {args.codebook} codes used")
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {out}/eval.json")
    common.ddp_end_stage()


def main():
    """python vqvae.py --task X [flags]: the old command, now `python X.py --stage oracle [shared flags]
    --oracle_flags "[the others]"` (this file imports no task script: the task script brings the data)."""
    args = p.parse_args()
    shared, rest = [], []
    for k, v in vars(args).items():
        if k != "task" and v != p.get_default(k):
            flag = [f"--{k}" if v else f"--no-{k}"] if isinstance(v, bool) else [f"--{k}", str(v)]
            (shared if k in SHARED else rest).extend(flag)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{args.task}.py")
    flags = f"--oracle_flags={shlex.join(rest)}"  # with "=": a lone "--no-local" is not taken for a flag of the script
    os.execv(sys.executable, [sys.executable, script, "--stage", "oracle", *shared, flags])


if __name__ == "__main__":
    common.run(main)
