"""UViM stage I: the VQ-VAE "oracle" that turns a task output into 256 discrete codes (Kolesnikov et al. 2022),
for panoptic.py (and, with its colour task, colorize.py) -- WORK IN PROGRESS (issue 3: panoptic part).

A ViT autoencoder over the task output with the image as context, added to the inputs of both its encoder
and decoder (so the codes only carry what the image does not tell). Bottleneck: a 16 x 16 grid = 256 codes;
cosine VQ (standardized vectors, unit-norm codewords, straight-through) with an EMA codebook whose dead codes
are restarted by splitting the most used one; code dropout while training.

    python vqvae.py --task panoptic     # train the oracle on the synthetic world, report its PQ and code usage
    python vqvae.py --task panoptic --tiny

Measured (2 CPU cores, 17 min, results/vqvae/): held-out PQ of the oracle's reconstructions 72.6 (things 53.6,
stuff 91.5), 463 of 512 codes used. The issue's bar is 85: not reached yet.

Panoptic output representation (UViM): per pixel one-hot semantics (category id, 0 = void) and one-hot
instance slots (every segment, stuff too, numbered 1..N in raster order of its centre of mass; 0 = void).
panoptic.py will import `encode(model, target, image) -> codes` and `decode(model, codes, image)`.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import UserError

# -----------------------------------------------------------------------------
# config

PRESETS = {"synthetic": dict(image_size=64, patch=8, width=128, depth=3, heads=4, codebook=512, code_dim=32,
                             instances=16, batch_size=32, steps=2000, lr=1e-3, warmup=100, eval_images=500,
                             num_train=10000, num_val=500)}
TINY = dict(image_size=32, patch=2, width=64, depth=1, codebook=64, batch_size=8, steps=30, warmup=5, eval_images=16,
            num_train=64, num_val=16)

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--task", default="panoptic", choices=["panoptic", "colorize"], help="what the codes encode")
p.add_argument("--data", default="synthetic", choices=["synthetic"], help="data source (COCO: not yet)")
p.add_argument("--out_dir", default="out", help="writes out_dir/vqvae_<task>/ckpt.pt, log.jsonl, eval.json")
p.add_argument("--image_size", type=int, default=None, help="square resolution of image and output (preset)")
p.add_argument("--patch", type=int, default=None, help="ViT patch; the token grid is resized to 16 x 16 codes")
p.add_argument("--width", type=int, default=None, help="transformer width (UViM: 768)")
p.add_argument("--depth", type=int, default=None, help="encoder depth; the decoder has twice as many blocks")
p.add_argument("--heads", type=int, default=None, help="attention heads")
p.add_argument("--codebook", type=int, default=None, help="number of codewords (COCO: 4096)")
p.add_argument("--code_dim", type=int, default=None, help="codeword dimension")
p.add_argument("--instances", type=int, default=None, help="instance slots of the panoptic output (COCO: 100)")
p.add_argument("--batch_size", type=int, default=None, help="global batch")
p.add_argument("--steps", type=int, default=None, help="training steps")
p.add_argument("--lr", type=float, default=None, help="peak learning rate (cosine schedule)")
p.add_argument("--warmup", type=int, default=None, help="linear warmup steps")
p.add_argument("--wd", type=float, default=1e-4, help="decoupled weight decay")
p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"], help="optimizer")
p.add_argument("--enc_lr_mult", type=float, default=1.0, help="encoder learning rate = lr x this")
p.add_argument("--clip", type=float, default=1.0, help="gradient clipping by global norm (0: off)")
p.add_argument("--code_dropout", action=argparse.BooleanOptionalAction, default=True,
               help="drop a random fraction U(0, 1) of the codes while training (UViM)")
p.add_argument("--resume", action="store_true", help="continue from out_dir/vqvae_<task>/ckpt.pt")
p.add_argument("--compile", action="store_true", help="torch.compile the model")
p.add_argument("--seed", type=int, default=0, help="seed of init, data order and code dropout")
p.add_argument("--log_every", type=int, default=100, help="print a line every this many steps")
p.add_argument("--ckpt_every", type=int, default=500, help="checkpoint every this many steps")
p.add_argument("--eval_images", type=int, default=None, help="held-out images for the oracle's report")
p.add_argument("--num_train", type=int, default=None, help="synthetic training scenes")
p.add_argument("--num_val", type=int, default=None, help="synthetic held-out scenes")
p.add_argument("--tiny", action="store_true", help="tiny model, data and steps (smoke test)")

# -----------------------------------------------------------------------------
# panoptic output <-> (semantics, instances) maps


def canonical(seg, segments):
    """Panoptic map (H, W) of segment ids + [{id, category_id}] -> semantics (H, W) = category id (0 void),
    instances (H, W) = 1..N in raster order of each segment's centre of mass (y-major), 0 void."""
    sem, inst = np.zeros(seg.shape, np.int64), np.zeros(seg.shape, np.int64)
    keys = []
    for s in segments:
        ys, xs = np.nonzero(seg == s["id"])
        if len(ys):
            keys.append((ys.mean() * seg.shape[1] + xs.mean(), s))
    for k, (_, s) in enumerate(sorted(keys, key=lambda t: t[0])):
        m = seg == s["id"]
        sem[m], inst[m] = s["category_id"], k + 1
    return sem, inst


def to_panoptic(sem_logits, inst_logits):
    """UViM decoding. (B, C, H, W), (B, I, H, W) -> segment index per pixel (B, H, W) (0 = void) and the
    category of each index (B, I) (-1 = none): argmax instance per pixel; each instance takes the category
    with the largest summed semantic logits over its pixels; category 0 (void) or instance 0 -> void."""
    inst = inst_logits.argmax(1)  # (B, H, W)
    onehot = F.one_hot(inst, inst_logits.shape[1]).permute(0, 3, 1, 2).float()  # (B, I, H, W)
    summed = torch.einsum("bihw,bchw->bic", onehot, sem_logits.float())  # (B, I, C)
    cat = summed.argmax(-1)
    present = onehot.sum((2, 3)) > 0
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
        self.enc_pos, self.dec_pos = (nn.Parameter(torch.randn(1, g * g, d) / d ** 0.5) for _ in range(2))
        self.enc = nn.ModuleList(common.Block(d, c["heads"]) for _ in range(c["depth"]))
        self.dec = nn.ModuleList(common.Block(d, c["heads"]) for _ in range(2 * c["depth"]))
        self.enc_ln, self.dec_ln = nn.LayerNorm(d), nn.LayerNorm(d)
        self.to_code, self.from_code = nn.Linear(d, c["code_dim"]), nn.Linear(c["code_dim"], d)
        self.head = nn.Linear(d, p * p * c["out_chans"])
        nn.init.zeros_(self.head.weight)  # UViM: zero-initialized output head
        # the codebook is state, not trained by gradients: running sums and counts (EMA)
        self.register_buffer("sums", torch.randn(c["codebook"], c["code_dim"]) / c["codebook"] ** 0.5)
        self.register_buffer("counts", torch.ones(c["codebook"]))
        self.gen = torch.Generator().manual_seed(0)  # dead-code restart noise: the same on every rank

    def grid(self, x, size):  # (B, N, D) tokens of a square grid -> (B, size * size, D), bilinear
        g = int(x.shape[1] ** 0.5)
        if g == size:
            return x
        x = F.interpolate(x.transpose(1, 2).reshape(x.shape[0], -1, g, g), (size, size), mode="bilinear")
        return x.flatten(2).transpose(1, 2)

    def encode_z(self, target, image):  # -> standardized pre-quantized vectors (B, 256, code_dim)
        x = self.embed(target).flatten(2).transpose(1, 2) + self.enc_ctx(image).flatten(2).transpose(1, 2)
        x = x + self.enc_pos
        for b in self.enc:
            x = b(x)
        z = self.to_code(self.grid(self.enc_ln(x), 16))
        return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-6)

    def codewords(self):
        return F.normalize(self.sums / self.counts[:, None], dim=-1)

    def quantize(self, z):  # nearest codeword by cosine similarity -> codes (B, 256)
        return (F.normalize(z, dim=-1) @ self.codewords().T).argmax(-1)

    def decode_codes(self, q, image):  # q (B, 256, code_dim) code vectors -> logits (B, out_chans, H, W)
        p, s = self.c["patch"], self.c["image_size"]
        x = self.grid(self.from_code(q), s // p) + self.dec_ctx(image).flatten(2).transpose(1, 2) + self.dec_pos
        for b in self.dec:
            x = b(x)
        y = self.head(self.dec_ln(x)).view(x.shape[0], s // p, s // p, -1, p, p)  # (B, g, g, C, p, p)
        return y.permute(0, 3, 1, 4, 2, 5).reshape(x.shape[0], -1, s, s)

    def forward(self, target, image, drop_gen=None):
        """Training pass: straight-through quantization, EMA codebook update, code dropout."""
        z = self.encode_z(target, image)
        codes = self.quantize(z)
        q = z + (self.codewords()[codes] - z).detach()  # forward: the unit codeword; backward: to z
        if self.training:
            self.ema_update(z.detach(), codes)
            if drop_gen is not None:  # UViM code dropout: keep (1 - u) of the 256 codes, u ~ U(0, 1)
                u = torch.rand(z.shape[0], 1, generator=drop_gen).to(z.device)
                keep = torch.rand(z.shape[0], z.shape[1], generator=drop_gen).to(z.device) >= u
                q = q * keep[..., None]
        return self.decode_codes(q, image), codes

    @torch.no_grad()
    def ema_update(self, z, codes, decay=0.995, min_count=0.1):
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
            noise = torch.empty_like(self.sums[hi]).uniform_(0.999, 1.001, generator=self.gen)
            self.sums[lo] = self.sums[hi] * noise
            self.counts[lo] = self.counts[hi] = self.counts[hi] / 2
            self.sums[lo] /= 2
            self.sums[hi] /= 2


def encode(model, target, image):
    """Frozen oracle: task output (one-hot, (B, C, H, W)) + image -> codes (B, 256)."""
    with torch.no_grad():
        return model.quantize(model.encode_z(target, image))


def decode(model, codes, image):
    """Codes (B, 256) + image -> output logits (B, C, H, W)."""
    with torch.no_grad():
        return model.decode_codes(model.codewords()[codes], image)


# -----------------------------------------------------------------------------
# data


class PanopticTargets(torch.utils.data.Dataset):
    """Synthetic scenes -> (index, image in [-1, 1], one-hot target (C + I, H, W), semantics, instances)."""

    def __init__(self, scenes, num_classes, instances):
        self.scenes, self.C, self.I = scenes, num_classes, instances

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, i):
        s = self.scenes[i]
        sem, inst = (torch.from_numpy(a) for a in canonical(s["panoptic"], s["segments"]))
        inst = inst.clamp(max=self.I - 1)  # more segments than slots: the last slot is shared
        target = torch.cat([F.one_hot(sem, self.C), F.one_hot(inst, self.I)], -1).permute(2, 0, 1).float()
        img = torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 127.5 - 1
        return i, img, target, sem, inst


def collate(batch):
    idx, img, target, sem, inst = zip(*batch)
    return torch.tensor(idx), torch.stack(img), torch.stack(target), torch.stack(sem), torch.stack(inst)


# -----------------------------------------------------------------------------
# the oracle's own quality: PQ of its reconstructions (panoptic.pq_image / pq_average, as pq_compute)


@torch.no_grad()
def report(model, ds, n, device, C):
    import panoptic  # here, not at the top: panoptic.py imports this file
    model.eval()
    stats, used = {}, torch.zeros(model.c["codebook"], dtype=torch.bool)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(min(n, len(ds)))), batch_size=64,
                                         collate_fn=collate)
    for idx, img, target, sem, inst in loader:
        img, target = img.to(device), target.to(device)
        codes = encode(model, target, img)
        used[codes.flatten().cpu()] = True
        logits = decode(model, codes, img)
        seg, cat = to_panoptic(logits[:, :C], logits[:, C:])
        for j, i in enumerate(idx.tolist()):
            s = ds.scenes[i]
            gt_segs = {x["id"]: dict(x, area=int((s["panoptic"] == x["id"]).sum())) for x in s["segments"]}
            pred_segs = {q: dict(category_id=int(cat[j, q]), area=int((seg[j] == q).sum()))
                         for q in range(1, cat.shape[1]) if cat[j, q] >= 0 and (seg[j] == q).any()}
            panoptic.pq_image(s["panoptic"].astype(np.uint32), gt_segs, seg[j].cpu().numpy().astype(np.uint32),
                              pred_segs, stats)
    model.train()
    res = {}
    for name, isthing in [("All", None), ("Things", True), ("Stuff", False)]:
        res[name] = {k: (100 * v if k != "n" else v) for k, v in
                     panoptic.pq_average(stats, {c["id"]: c for c in common.CATEGORIES}, isthing)[0].items()}
    res["codes_used"] = int(used.sum())
    return res


# -----------------------------------------------------------------------------
# training


def train(args):
    rank, world, device = common.ddp_setup()
    torch.manual_seed(args.seed)
    if args.task != "panoptic":
        raise UserError("vqvae.py --task colorize: not written yet (issue 4)")
    if args.image_size % args.patch:
        raise UserError(f"--image_size {args.image_size} is not a multiple of --patch {args.patch}")
    C = len(common.CATEGORIES) + 1  # semantic classes incl. void
    tr = PanopticTargets(common.SyntheticWorld("train", args.num_train, args.image_size, args.seed).scenes, C,
                         args.instances)
    va = PanopticTargets(common.SyntheticWorld("val", args.num_val, args.image_size, args.seed).scenes, C,
                         args.instances)
    cfg = dict(image_size=args.image_size, patch=args.patch, width=args.width, depth=args.depth, heads=args.heads,
               codebook=args.codebook, code_dim=args.code_dim, out_chans=C + args.instances, classes=C,
               instances=args.instances)
    out = os.path.join(args.out_dir, f"vqvae_{args.task}")
    path, start = os.path.join(out, "ckpt.pt"), 0
    raw = VQVAE(cfg).to(device)
    opt = common.make_optimizer(raw, args.optimizer, args.lr, args.wd, args.enc_lr_mult)
    if args.resume and os.path.exists(path):
        ck = common.load_ckpt(path, f"vqvae_{args.task}")
        raw.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start = ck["step"]
    model = torch.compile(raw) if args.compile else raw
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    log = common.Logger(out, rank == 0, resume=start > 0)
    sampler = common.StepSampler(len(tr), args.batch_size, args.seed, start, args.steps, rank, world)
    loader = torch.utils.data.DataLoader(tr, batch_sampler=sampler, collate_fn=collate)
    t0 = time.time()
    for step, (idx, img, target, sem, inst) in enumerate(tqdm(loader, disable=rank > 0, initial=start,
                                                               total=args.steps, desc="vqvae"), start):
        common.set_lr(opt, step, args.lr, args.warmup, args.steps, "cosine")
        img, target, sem, inst = img.to(device), target.to(device), sem.to(device), inst.to(device)
        gen = torch.Generator().manual_seed(args.seed * 7919 + step) if args.code_dropout else None

        def micro():
            logits, codes = model(target, img, gen)
            loss = F.cross_entropy(logits[:, :C], sem) + F.cross_entropy(logits[:, C:], inst)
            return loss, dict(used=codes.unique().numel())
        stats = common.train_step(model, opt, args, [micro], world)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            log(step + 1, lr=opt.param_groups[0]["lr"], s_per_step=(time.time() - t0) / (step + 1 - start), **stats)
        if rank == 0 and ((step + 1) % args.ckpt_every == 0 or step + 1 == args.steps):
            common.save_ckpt(path, task=f"vqvae_{args.task}", model=raw.state_dict(), optimizer=opt.state_dict(),
                             step=step + 1, config=cfg, args=vars(args))
    if rank == 0:
        res = report(raw, va, args.eval_images, device, C)
        log(args.steps, **{f"val_{k}_{m}": v for k, d in res.items() if isinstance(d, dict) for m, v in d.items()},
            val_codes_used=res["codes_used"])
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(f"oracle on {min(args.eval_images, len(va))} held-out scenes: PQ {res['All']['pq']:.1f} (things "
              f"{res['Things']['pq']:.1f}, stuff {res['Stuff']['pq']:.1f}), {res['codes_used']} of "
              f"{args.codebook} codes used; wrote {out}/eval.json")
    common.ddp_cleanup()


def main():
    args = p.parse_args()
    preset = dict(PRESETS[args.data], **(TINY if args.tiny else {}))
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    train(args)


if __name__ == "__main__":
    common.run(main)
