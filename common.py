"""rewardtune's shared core: errors, DDP, device | logging | ViT encoder, decoder with cross-attention | sampling with
a KV cache | mle_loss, reinforce_loss (paper Algorithms 1, 2) | optimizer | checkpoints | data | synthetic world."""
import argparse
import functools
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw
from tqdm import tqdm

# ---- errors, DDP, device ---------------------------------------------------------------------------------------------
class UserError(Exception):
    """Bad input (path, file, flag, checkpoint): printed as one line, exit code 2."""

class Help(argparse.RawDescriptionHelpFormatter):  # --help shows each fixed default; "(preset)" ones: PRESETS
    def _get_help_string(self, a):  # not shown: None (the preset's), "", switches and -h (nargs 0)
        return a.help + (" (default: %(default)s)" if a.nargs != 0 and a.default not in (None, "") else "")

def run(main):  # main(); a UserError or OSError -> one line, exit 2 (a DataLoader worker's: its message's last line)
    try:
        main()
    except (UserError, OSError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[-1].removeprefix("common.UserError: ")
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: checkpoints written so far are intact; --resume continues from the last", file=sys.stderr)
        sys.exit(130)
    finally:  # also after --stop_at's SystemExit: every exit path releases the process group
        if dist.is_initialized():
            dist.destroy_process_group()

def ddp_setup():  # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        device = f"cuda:{local}" if cuda else "cpu"
        torch.cuda.set_device(device) if cuda else None
        if not dist.is_initialized():  # one group for all stages; 1 h: others wait while rank 0 evals (NCCL: 10 min)
            dist.init_process_group("nccl" if cuda else "gloo", timeout=2 * dist.default_pg_timeout)
    else:
        rank, world, device = 0, 1, "cuda" if cuda else "cpu"
    if not cuda and world > 1:  # CPU processes on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    torch.backends.cuda.matmul.allow_tf32 = True
    return rank, world, device

def ddp_end_stage():  # end of a stage: all ranks meet; the group lives until run() ends (re-creating it hung torchrun)
    return dist.barrier() if dist.is_initialized() else None

def autocast(device):  # bf16 autocast on CUDA; full fp32 on CPU (CPU bf16 is slow and not what we test)
    return torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else nullcontext()

def replica_checksums(model):  # sum of all weights, one per rank: equal when DDP kept the replicas in sync
    s = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    out = [torch.zeros_like(s) for _ in range(dist.get_world_size())] if dist.is_initialized() else [s]
    dist.all_gather(out, s) if dist.is_initialized() else None
    return [float(x) for x in out]

# ---- logging: one readable line per --log_every on rank 0, and every line in log.jsonl -------------------------------
class Logger:
    def __init__(self, out_dir, master, resume=0):
        self.master, self.path = master, os.path.join(out_dir, "log.jsonl")
        if master:  # resumed at step `resume`: keep the records up to it, drop those of the lost steps after it
            os.makedirs(out_dir, exist_ok=True)
            old = open(self.path).readlines() if resume and os.path.exists(self.path) else []
            with open(self.path, "w") as f:
                f.writelines(r for r in old if r.endswith("\n") and json.loads(r)["step"] <= resume)

    def __call__(self, step, quiet=False, **metrics):
        if not self.master:
            return
        rec = {"step": step, "time": round(time.time(), 2), **{k: (round(float(v), 5) if isinstance(
            v, (float, int, torch.Tensor, np.floating)) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if not quiet:
            print0(" | ".join([f"step {step}"] + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in rec.items() if k not in ("step", "time")]))

def print0(*a, **k):
    return print(*a, **k, flush=True) if not dist.is_initialized() or dist.get_rank() == 0 else None

# ---- models: ViT encoder (pre-LN), autoregressive decoder with cross-attention ---------------------------------------
SIZES = {"tiny": (128, 4, 4), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16)}  # width, depth, heads

def model_config(model, image_size, vocab, seq_len, bos, dec_layers, patch=16, in_chans=3):
    """'B/16' -> a plain dict (it goes into checkpoints as is); 'tiny' takes patch from the preset."""
    name, _, p = model.partition("/")
    if name not in SIZES or p and not (p.isdigit() and int(p) > 0):
        raise UserError(f"--model {model}: unknown size, choose from {', '.join(SIZES)} (e.g. B/16: patch 16)")
    (width, depth, heads), patch = SIZES[name], int(p) if p else patch
    if min(image_size, patch) <= 0 or image_size % patch:
        raise UserError(f"--image_size {image_size}, patch {patch}: need both > 0, the size a multiple of the patch")
    return dict(width=width, enc_depth=depth, dec_depth=dec_layers, heads=heads, patch=patch,
                image_size=image_size, in_chans=in_chans, vocab=vocab, seq_len=seq_len, bos=bos)

class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h, self.q, self.kv, self.out = heads, nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def split(self, x):  # (B, T, D) -> (B, H, T, D/H); not einops: ~20 calls per sampled token, each 2x slower
        return x.view(x.shape[0], x.shape[1], self.h, -1).transpose(1, 2)

    def memory_kv(self, mem):  # cross-attention K/V of the encoder output, computed once per image
        return tuple(map(self.split, self.kv(mem).chunk(2, -1)))

    def forward(self, x, kv=None, causal=False, cache=None, pos=0):
        B, T, D = x.shape
        k, v = self.memory_kv(x) if kv is None else kv  # self-attention, or cross-attention to given K/V
        r = B // k.shape[0]  # cross-attention: R samples per image share its K/V, (B, T) queries -> (B/R, R*T)
        q = self.q(x).view(B // r, r, T, self.h, -1).permute(0, 3, 1, 2, 4).flatten(2, 3)  # (B/R, H, R*T, D/H)
        if kv is None and cache is not None:  # cache: (2, B, H, L, D/H); write T new positions at pos
            assert T == 1 or pos == 0, "cached attention takes one token at a time"
            cache[0, :, :, pos:pos + T], cache[1, :, :, pos:pos + T] = k, v
            k, v = cache[0, :, :, :pos + T], cache[1, :, :, :pos + T]
            causal = causal and T > 1  # a single new query may see every cached key
        if T == 1 and not x.is_cuda:  # one query per sequence (sampling): a plain matmul; CPU sdpa: ~0.5 ms a call
            y = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B/R, H, R*T, D/H)
        return self.out(y.view(B // r, self.h, r, T, -1).permute(0, 2, 3, 1, 4).reshape(B, T, D))

class Block(nn.Module):
    """Pre-LN block: self-attention, optional cross-attention to the encoder, MLP."""
    def __init__(self, d, heads, cross=False):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads)
        self.lnc, self.cross = (nn.LayerNorm(d), Attention(d, heads)) if cross else (None, None)
        self.ln2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mem_kv=None, causal=False, cache=None, pos=0):
        x = x + self.attn(self.ln1(x), causal=causal, cache=cache, pos=pos)
        if self.cross is not None:
            x = x + self.cross(self.lnc(x), kv=mem_kv)
        return x + self.mlp(self.ln2(x))

def sincos(values, dim):  # (N,) positions -> (N, dim) sin-cos features (the Transformer's), RMS ~0.7
    freq = 1.0 / 10000 ** (torch.arange(0, dim // 2, dtype=torch.float32) / (dim // 2))
    x = values.float()[:, None] * freq[None]
    return torch.cat([x.sin(), x.cos()], 1)

class ViT(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, g = c["width"], c["image_size"] // c["patch"]
        self.patch = nn.Conv2d(c["in_chans"], d, c["patch"], c["patch"])
        # learned position embedding, started at 2D sin-cos (half the features for y, half for x):
        # a small model on little data learns where things are much sooner than from noise
        yy, xx = (t.flatten() * 4 for t in torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"))
        self.pos = nn.Parameter(torch.cat([sincos(yy, d // 2), sincos(xx, d // 2)], 1)[None])
        self.blocks, self.ln = nn.ModuleList(Block(d, c["heads"]) for _ in range(c["enc_depth"])), nn.LayerNorm(d)

    def forward(self, img):  # (B, C, H, W) -> (B, N, D)
        x = rearrange(self.patch(img), "b d gh gw -> b (gh gw) d") + self.pos
        for b in self.blocks:
            x = b(x)
        return self.ln(x)

class Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["width"]
        self.tok, self.pos = nn.Embedding(c["vocab"], d), nn.Parameter(torch.randn(1, c["seq_len"], d) * 0.02)
        nn.init.normal_(self.tok.weight, std=0.02)  # GPT-2's scale: with the tied head, logits start near 0
        self.blocks = nn.ModuleList(Block(d, c["heads"], cross=True) for _ in range(c["dec_depth"]))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, c["vocab"])
        self.head.weight = self.tok.weight  # tied: whatever structure the embeddings have, the outputs share

    def forward(self, tokens, mem_kv, caches=None, pos=0):  # tokens (B, T) -> logits (B, T, V)
        x = self.tok(tokens) + self.pos[:, pos:pos + tokens.shape[1]]
        for i, b in enumerate(self.blocks):
            x = b(x, mem_kv[i], causal=True, cache=None if caches is None else caches[i], pos=pos)
        return self.head(self.ln(x))

class EncoderDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.encoder, self.decoder = cfg, ViT(cfg), Decoder(cfg)

    def memory_kv(self, images):  # encoder once per image, cross-attention K/V once per layer; samples share them
        mem = self.encoder(images)  # contiguous: else matmul copies the (B, H, M, D/H) view at every sampled token
        return [tuple(t.contiguous() for t in b.cross.memory_kv(mem)) for b in self.decoder.blocks]

    def forward(self, images, tokens, allowed=None, kv=None):
        """Teacher forcing. images (B, C, H, W), tokens (B*R, L) with R samples per image -> logits (B*R, L, V)
        predicting tokens[:, t] from BOS + tokens[:, :t]; allowed (L, V): the grammar; kv: memory_kv(images) or None"""
        inp = torch.cat([torch.full_like(tokens[:, :1], self.cfg["bos"]), tokens[:, :-1]], 1)
        logits = self.decoder(inp, kv or self.memory_kv(images))
        return logits if allowed is None else logits.masked_fill(~allowed[: tokens.shape[1]], float("-inf"))

def load_timm_encoder(model, path):
    """--init_encoder: a local ViT checkpoint in timm's key naming (patch_embed, blocks.i.attn.qkv, ...)."""
    sd, enc = torch_load(path), model.encoder
    try:
        sd = sd.get("model", sd.get("state_dict", sd))  # not a dict: AttributeError, reported below
        if "encoder" in sd:  # --stage encoder's encoder.pt: our own key names
            return enc.load_state_dict(sd["encoder"])
        new = {"patch.weight": sd["patch_embed.proj.weight"], "patch.bias": sd["patch_embed.proj.bias"]}
        pos = sd["pos_embed"][:, 1:] if "cls_token" in sd else sd["pos_embed"]  # timm's class token: we have none
        if pos.shape[1] != enc.pos.shape[1]:  # other resolution: resize the position grid bilinearly
            g0, g1 = int(math.isqrt(pos.shape[1])), int(math.isqrt(enc.pos.shape[1]))
            pos = F.interpolate(pos.reshape(1, g0, g0, -1).permute(0, 3, 1, 2), (g1, g1), mode="bilinear")
            pos = pos.permute(0, 2, 3, 1).reshape(1, g1 * g1, -1)
        new["pos"] = pos
        names = {"norm1": "ln1", "norm2": "ln2", "attn.proj": "attn.out", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}
        for p, s in [(f"blocks.{i}.", s) for i in range(len(enc.blocks)) for s in ("weight", "bias")]:
            new |= {f"{p}{b}.{s}": sd[f"{p}{a}.{s}"] for a, b in names.items()}
            qkv = sd[f"{p}attn.qkv.{s}"]  # timm's fused qkv -> our q and kv
            new[f"{p}attn.q.{s}"], new[f"{p}attn.kv.{s}"] = qkv[: len(qkv) // 3], qkv[len(qkv) // 3:]
        new["ln.weight"], new["ln.bias"] = sd["norm.weight"], sd["norm.bias"]
        enc.load_state_dict(new)
    except (KeyError, RuntimeError, AttributeError) as e:
        raise UserError(f"{path}: not a ViT for this --model / image size ({str(e).strip().splitlines()[-1][:150]})")

def init_encoder(raw, args, task):
    """A new mle model's ViT: --init_encoder, else --stage encoder's output (synthetic world only), else random."""
    enc = os.path.join(args.out_dir, task, "encoder", "encoder.pt")
    if enc := args.init_encoder or (enc if os.path.exists(enc) and args.data == "synthetic" else ""):
        load_timm_encoder(raw, enc)
    print0(f"encoder: {enc or 'random init (no --init_encoder, no encoder.pt of --stage encoder)'}")

# ---- sampling: encoder once, cross-attention K/V once, self-attention KV cache ---------------------------------------
def example_noise(seed, step, index, k, length):
    """(B, K, L) uniform noise for inverse-CDF sampling from (seed, step, global example index): any world size alike"""
    return torch.stack([torch.rand(k, length, generator=torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, step, int(i)]).generate_state(1)[0]))) for i in index])

@torch.no_grad()
def sample(model, images, seq_len, k=1, temperature=1.0, top_k=0, top_p=1.0, noise=None, allowed=None,
           end_token=None, pad_token=0, use_cache=True, kv=None):
    """Autoregressive sampling of K sequences per image (temperature 0: greedy) -> tokens (B, K, L) and their log-probs
    (B, K, L) under the model at temperature 1 (what REINFORCE differentiates); after end_token: pad_token, logp 0."""
    B, N, dev, c = images.shape[0], images.shape[0] * k, images.device, model.cfg
    kv, noise = kv or model.memory_kv(images), None if noise is None else noise.to(dev)  # once: a copy a token syncs
    tokens = torch.full((N, seq_len + 1), c["bos"], dtype=torch.long, device=dev)
    logps, ended = torch.zeros(N, seq_len, device=dev), torch.zeros(N, dtype=torch.bool, device=dev)
    caches = [torch.empty(2, N, c["heads"], seq_len, c["width"] // c["heads"], device=dev, dtype=kv[0][0].dtype)
              for _ in kv] if use_cache else None
    for t in range(seq_len):
        # without the cache: full recompute of the prefix, the slow reference the cache is tested against
        inp, pos = (tokens[:, t:t + 1], t) if use_cache else (tokens[:, :t + 1], 0)
        logits = model.decoder(inp, kv, caches, pos=pos)[:, -1].float()
        logits = logits if allowed is None else logits.masked_fill(~allowed[t], float("-inf"))
        logp = logits.log_softmax(-1)  # (N, V)
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            probs = (logits / temperature).softmax(-1)
            if top_k > 0:
                probs = probs.masked_fill(probs < probs.topk(top_k, -1).values[:, -1:], 0)
            if top_p < 1.0:  # nucleus: the smallest top set with mass >= top_p of what top-k left
                sp, si = probs.sort(-1, descending=True)
                probs = probs.scatter(-1, si, sp.masked_fill(sp.cumsum(-1) - sp >= top_p * sp.sum(-1, keepdim=True), 0))
            cdf = probs.cumsum(-1)
            u = (noise[:, :, t].reshape(N) if noise is not None else torch.rand(N, device=dev))
            tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=cdf.shape[1] - 1)
        tok_logp = logp.gather(1, tok[:, None])[:, 0]
        if end_token is not None:
            tok, tok_logp = tok.masked_fill(ended, pad_token), tok_logp.masked_fill(ended, 0.0)
            ended |= tok == end_token
        tokens[:, t + 1], logps[:, t] = tok, tok_logp
        if end_token is not None and (dev.type != "cuda" or t % 16 == 15) and bool(ended.all()):  # CUDA: bool() syncs
            tokens[:, t + 2:] = pad_token
            break
    return tokens[:, 1:].view(B, k, seq_len), logps.view(B, k, seq_len)

def until_end(tokens, end_token):  # (..., L) bool: up to and including the first end_token (ending is an action too)
    is_end = (tokens == end_token).long()
    return (is_end.cumsum(-1) - is_end) == 0

# ---- the two steps: MLE (paper Algorithm 1) and REINFORCE (paper Algorithm 2) ----------------------------------------
def token_logp(logits, tokens):  # (N, L, V), (N, L) -> (N, L) log p(token)
    return logits.float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0]

def mle_loss(model, images, tokens, weight, allowed=None):
    """Teacher-forced cross-entropy, weight (B, L). loss = sum / (B * L), not / token count: micro-batches and ranks
    then average to exactly the global batch's loss. Returns loss, logits, {"nll": mean per weighted token}."""
    logits = model(images, tokens, allowed)
    nll = torch.where(weight > 0, -token_logp(logits, tokens), 0.0)  # after the end: maybe off-grammar
    s = (nll * weight).sum()
    return s / weight.numel(), logits, {"nll": (s / weight.sum().clamp(min=1)).item()}

def baseline(r, kind):
    """r (B, K) rewards of K samples per image -> b (B, K), each b_k independent of sample k.
    none: 0 | independent: another sample's reward (Algorithm 2) | loo: mean of the other K-1."""
    if kind == "none":
        return torch.zeros_like(r)
    if r.shape[1] < 2:
        raise UserError(f"--baseline {kind} needs --samples >= 2")
    return r.roll(-1, dims=1) if kind == "independent" else (r.sum(1, keepdim=True) - r) / (r.shape[1] - 1)

def reinforce_loss(model, images, tokens, rewards, mask, kind="loo", grad_on="first", allowed=None):
    """REINFORCE with a baseline: loss = -mean_i (r_i - b_i) * sum_t mask_it log p(y_it | x_i, y_i<t) / L,
    the authors' scale (mean over all L positions): a task's auxiliary losses keep their weight's meaning.
    tokens (B, K, L) sampled without grad; rewards (B, K); mask (B, K, L) = positions that were actions.
    grad_on 'first' trains sample 0 only (paper, big_vision), 'all' every sample. One teacher-forced
    forward of fixed shape (DDP-safe). Returns loss, logits, the trained samples' tokens and mask, stats."""
    adv = rewards - baseline(rewards, kind)
    if grad_on == "first":
        tokens, mask, adv = tokens[:, :1], mask[:, :1], adv[:, :1]
    B, K, L = tokens.shape
    tokens, mask = tokens.reshape(B * K, L), mask.reshape(B * K, L)
    logits = model(images, tokens, allowed)
    logp = torch.where(mask, token_logp(logits, tokens), 0.0).sum(-1)  # (B*K,)
    loss = -(adv.reshape(-1).detach() * logp).mean() / L
    return loss, logits, tokens, mask, {"adv_std": adv.std().item() if adv.numel() > 1 else 0.0,
                                        "logp": logp.mean().item()}

# ---- optimizer and LR schedule ---------------------------------------------------------------------------------------
def make_optimizer(model, name, lr, wd, enc_lr_mult):
    """AdamW or torch.optim.Adafactor; no weight decay on biases, norms, embeddings; encoder at lr x mult."""
    groups = {}
    for n, p in model.named_parameters():
        enc, decay = n.startswith("encoder."), p.ndim >= 2 and not n.endswith(("pos", "tok.weight"))
        groups.setdefault((enc, decay), {"params": [], "lr_mult": enc_lr_mult if enc else 1.0,
                                         "weight_decay": wd if decay else 0.0})["params"].append(p)
    return (torch.optim.AdamW(list(groups.values()), lr=lr, betas=(0.9, 0.95)) if name == "adamw" else
            torch.optim.Adafactor(list(groups.values()), lr=lr))  # name: one of argparse's choices

def set_lr(opt, step, base, warmup, total, schedule):
    """Linear warmup, then constant (reward tuning) or cosine to zero (MLE); each group at base x lr_mult."""
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))  # 1 -> 0 after warmup
    lr = base * (step + 1) / warmup if step < warmup else base * (cos if schedule == "cosine" else 1.0)
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_mult"]

# ---- checkpoints: one dict from the raw model, written atomically, loaded with weights_only --------------------------
def save_ckpt(path, **obj):  # atomic: a kill mid-write leaves the previous checkpoint intact
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)

def torch_load(path, mmap=False):  # mmap (our checkpoints, zip format): ranks share the file's pages, nothing copied
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file" + " (run --stage mle)" * path.endswith(f"{os.sep}mle{os.sep}ckpt.pt"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).split('. ')[0][:100]})")

def load_ckpt(path, task):
    ck = torch_load(path, mmap=True)  # else every rank copies it: ViT-L + AdamW ~8.5 GB, eval reads three
    need = sorted({"model", "config", "args", "step", "task"} | ({"meta"} if not task.startswith("vqvae") else set()))
    if miss := [k for k in need if not isinstance(ck, dict) or k not in ck]:  # a hand-made one: else a KeyError later
        raise UserError(f"{path}: not a rewardtune checkpoint (no {'/'.join(miss)})")
    if ck.get("task") != task:
        raise UserError(f"{path}: a checkpoint of task '{ck.get('task')}', not '{task}'")
    return ck

def fingerprint(state):  # sha1 of a state dict's tensors: which checkpoint a stage started from (its meta["start"])
    h = hashlib.sha1()
    for k in sorted(state):
        h.update(k.encode() + state[k].cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]

def eval_checkpoints(out_dir, task):
    """The eval stage's checkpoints {name: (path, ck)} of mle, mle_cont, reward(_<name>) that exist, side by side
    only if each started from the mle checkpoint here, and mle_cont at each reward stage's lr / schedule / steps."""
    d = os.path.join(out_dir, task)  # reward_<name>/: a --reward other than the task's first (stage_flags)
    more = sorted(n for n in os.listdir(d) if n.startswith("reward_")) if os.path.isdir(d) else []
    paths = {n: os.path.join(d, n, "ckpt.pt") for n in ["mle", "mle_cont", "reward"] + more}
    if not (cks := {n: (q, load_ckpt(q, task)) for n, q in paths.items() if os.path.exists(q)}):
        raise UserError(f"no checkpoint under {d}: run --stage mle first")
    start = fingerprint(cks["mle"][1]["model"]) if "mle" in cks else None
    for n, (q, ck) in cks.items():
        if n != "mle" and start and ck["meta"].get("start") != start:
            raise UserError(f"{q}: did not start from {paths['mle']} (--init? mle retrained?): re-run --stage {n}")
    ctl = {n: {k: ck["args"].get(k) for k in CONTROL} | {"steps": ck["step"]} for n, (_, ck) in cks.items()}
    for n in (n for n in ctl if n.startswith("reward") and "mle_cont" in ctl and ctl[n] != ctl["mle_cont"]):
        raise UserError(f"{paths['mle_cont']}: not the control of {n} ({ctl['mle_cont']}; {n}: {ctl[n]}): re-run")
    return cks

def build_model(cfg, device, state=None, path="checkpoint", image_size=None):
    if image_size and cfg["image_size"] != image_size:  # else a shape error deep in the position embedding
        raise UserError(f"{path}: a model of {cfg['image_size']} px images, this run has {image_size} (--tiny?)")
    model = EncoderDecoder(cfg)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"{path}: weights do not fit the model ({str(e).splitlines()[1].strip()[:120]})")
    return model.to(device)

CONTROL = ("lr", "warmup", "wd", "schedule", "batch_size", "enc_lr_mult", "optimizer", "clip")  # mle_cont = reward's
def check_positive(args):  # counts, intervals, lr, T, decoder depth: 0 breaks or trains nothing (None: preset)
    names = ("lr steps batch_size samples ckpt_every log_every eval_images temperature dec_layers patch image_size"
             + " num_train num_val" * (getattr(args, "data", "") == "synthetic")).split()  # real data: 0 = unused
    zero = "micro_batch seed workers stop_at eval_every warmup wd enc_lr_mult clip".split()  # >= 0: 0 = none / off
    if bad := [f"--{k} {v}: must be {'>= 0' if k in zero else '> 0'}" for k, v in vars(args).items()
               if (k.startswith("max_") or k in names + zero) and v is not None and v <= -(k in zero)]:
        raise UserError(", ".join(bad))

def stage_flags(args, preset, stage, given, task, rewards):
    """This stage's --steps / --lr / --warmup / --wd (`given`, else the preset's enc_ / mle_ / reward_) and schedule;
    mle_cont (the fair control) copies the reward stage's. A --reward not first in rewards writes reward_<name>/."""
    check_positive(args)
    if stage == "eval" and args.init:  # eval reads the checkpoints under --out_dir: --init was ignored without a word
        raise UserError(f"--init {args.init}: --stage eval compares out_dir/{task}/*/ckpt.pt; point --out_dir there")
    if args.reward not in rewards:  # not argparse's choices: a reward added to REWARDS needs no second edit
        raise UserError(f"--reward {args.reward}: not in REWARDS ({', '.join(rewards)})")
    args.reward_dir = "reward" if args.reward == next(iter(rewards)) else f"reward_{args.reward}"
    if stage == "mle_cont":
        path = os.path.join(args.out_dir, task, args.reward_dir, "ckpt.pt")  # missing: one line, run that stage first
        ck = load_ckpt(path, task)
        was = {k: ck["args"].get(k) for k in CONTROL} | {"steps": ck["step"]}
        if bad := [k for k, v in given.items() if v is not None and v != was[k]]:
            raise UserError(f"--stage mle_cont runs at the reward stage's {', '.join(f'--{k} {was[k]}' for k in bad)} "
                            f"({path}): drop those flags")
        vars(args).update(was)
        return print0(f"mle_cont, as {path}: " + ", ".join(f"{k} {v}" for k, v in was.items()))
    kind = {"reward": "reward", "encoder": "enc"}.get(stage, "mle")
    vars(args).update({k: preset.get(f"{kind}_{k}") if v is None else v for k, v in given.items()},
                      schedule="constant" if stage == "reward" else "cosine")
    if stage == "reward" and args.baseline == "none" and args.temperature != 1:  # README: REINFORCE at T != 1
        raise UserError(f"--baseline none with --temperature {args.temperature}: the gradient of the untempered "
                        "log p is then biased towards the tempered policy whatever the reward; use a baseline or T 1")

def stage_setup(task, stage, args, cfg, meta, device, world, init_state=None):
    """Model, optimizer, --resume, DDP of a stage: the raw model samples, evaluates, saves; the wrapped one trains."""
    path = os.path.join(args.out_dir, task, args.reward_dir if stage == "reward" else stage, "ckpt.pt")
    start, opt_state, b, init = 0, None, args.batch_size // world, os.path.join(args.out_dir, task, "mle", "ckpt.pt")
    if args.micro_batch and b % args.micro_batch:  # unequal parts: unequal weights (< 0: check_positive)
        raise UserError(f"--micro_batch {args.micro_batch}: must be 0 (whole) or divide the per-process batch {b}")
    if args.resume and os.path.exists(path):
        ck = load_ckpt(path, task)
        keys = CONTROL + ("seed", "min_count", "max_len") + (  # else a crash, or a stage that is not its control's
            ("samples", "baseline", "grad_on", "temperature", "reward") if stage.startswith("reward") else ())
        if diff := {k: ck["args"].get(k) for k in keys if ck["args"].get(k) != vars(args).get(k)} | {
                k: v for k, v in ck["config"].items() if cfg.get(k, v) != v}:  # --dec_layers, --patch, --max_boxes...
            raise UserError(f"{path}: made with {diff}; resume with the same flags")
        init_state, cfg, meta, start, opt_state = ck["model"], ck["config"], ck["meta"], ck["step"], ck["optimizer"]
        print0(f"resuming {path} at step {start}" + " (finished; --stage eval evaluates it)" * (start >= args.steps))
    elif init_state is not None:  # which checkpoint this stage tuned: eval pairs reward and mle_cont by it
        meta = dict(meta, start=fingerprint(init_state))
    raw = build_model(cfg, device, init_state, path if start else args.init or init, args.image_size)
    opt = make_optimizer(raw, args.optimizer, args.lr, args.wd, args.enc_lr_mult)
    opt.load_state_dict(opt_state) if opt_state is not None else None
    model = torch.compile(raw) if args.compile else raw
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if "cuda" in str(device) else None)
    return raw, model, opt, start, path, meta

def save_stage(path, task, raw, opt, step, args, meta):
    save_ckpt(path, task=task, model=raw.state_dict(), optimizer=opt.state_dict(), step=step,
              config=raw.cfg, meta=meta, args=vars(args))

def train_step(model, opt, args, micro_losses, world):
    """Gradient accumulation over micro-batches (no DDP sync until the last), clip, step. micro_losses: one closure per
    micro-batch, () -> (loss, stats dict). Returns the stats averaged over micro-batches and ranks; stops on NaN/inf."""
    stats = {}
    for i, f in enumerate(micro_losses):
        sync = world == 1 or i == len(micro_losses) - 1
        with (nullcontext() if sync else model.no_sync()):
            loss, st = f()
            (loss / len(micro_losses)).backward()
        for k, v in dict(st, loss=loss.item()).items():
            stats[k] = stats.get(k, 0.0) + float(v) / len(micro_losses)
    if args.clip > 0:
        stats["grad_norm"] = float(nn.utils.clip_grad_norm_(model.parameters(), args.clip))
    opt.step()
    opt.zero_grad(set_to_none=True)
    keys = sorted(stats)
    vals = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=next(model.parameters()).device)
    if dist.is_initialized():  # sum over ranks (on the model's device: NCCL reduces no CPU tensor); every rank
        dist.all_reduce(vals)
    stats = dict(zip(keys, (vals / world).tolist()))  # the mean over ranks
    if not torch.isfinite(vals).all():
        raise UserError(f"non-finite training statistics {stats}: lower --lr; the last checkpoint is intact (--resume)")
    return stats

# ---- data: the order is a function of (seed, step) only (runs resume exactly, any world size); readable files --------
class StepSampler:
    """DataLoader batch_sampler: this rank's contiguous slice of every step's global batch of dataset indices (drawn
    with replacement), for steps start..steps-1. Example j of rank r sits at global position r * (batch / world) + j."""
    def __init__(self, n, global_batch, seed, start, steps, rank, world):
        if global_batch % world:
            raise UserError(f"--batch_size {global_batch} is not divisible by {world} processes")
        self.n, self.batch, self.seed, self.range = n, global_batch, seed, range(start, steps)
        self.slice = slice(rank * global_batch // world, (rank + 1) * global_batch // world)

    def __iter__(self):
        for step in self.range:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            yield torch.randint(self.n, (self.batch,), generator=g)[self.slice].tolist()

def open_rgb(item):  # an item's image as a PIL RGB image: the synthetic world's array, or its file (bad: one line)
    if "image" in item:
        return Image.fromarray(item["image"])
    try:
        with Image.open(item["file"]) as im:
            if im.mode.startswith("I"):  # 16-bit PNGs (I;16, or I): convert("RGB") clips them to white: rescale
                return Image.fromarray((np.asarray(im, np.float64) / 257).round().astype(np.uint8)).convert("RGB")
            return im.convert("RGB")
    except OSError as e:  # readable() checked a PNG's chunks, not its pixels
        raise UserError(f"{item['file']}: unreadable image ({type(e).__name__}: {str(e)[:80]})")

@functools.lru_cache(maxsize=1 << 18)  # --stage all loads the data at each stage: a file is read once (COCO's 250k)
def decodes(f, size):  # the file decodes, and has the annotated size (w, h) if one is given (else: EXIF rotation?)
    try:
        with Image.open(f) as im:
            if size and im.size != size:
                return False
            if im.format == "JPEG":  # verify() skips JPEG's pixels: a 1/8-size decode reads every byte (0.4 ms)
                im.draft("RGB", (1, 1))
                im.load()
                return True
            return im.verify() is None  # PNG: checks every chunk's CRC
    except Exception:
        return False

def readable(items, what):
    """Real data: drop items whose "file" / "png" do not decode or differ from "size" (EXIF rotation?), with a count."""
    ok = [it for it in items if all(os.path.isfile(it[k]) and decodes(it[k], tuple(it.get("size") or ()))
                                    for k in ("file", "png") if k in it)]  # isfile: open would block on a FIFO
    if bad := len(items) - len(ok):  # not fatal in big data
        print0(f"warning: {what}: skipped {bad} of {len(items)} images: unreadable, or not of their annotated size")
    if not ok:
        raise UserError(f"{what}: no readable images")
    return ok

# ---- the synthetic world: procedural scenes, deterministic by seed, with every annotation the tasks use --------------
THINGS = ["square", "circle", "triangle", "star", "ring"]
STUFF = ["sky", "wall", "grass", "water", "sand"]  # first two go on top, last three at the bottom
CATEGORIES = [dict(id=i + 1, name=n, isthing=int(n in THINGS)) for i, n in enumerate(THINGS + STUFF)]
# Thing colours: CIE Lab L* = 62, chroma 42 at the hue angles of HUES, in sRGB (colorize.lab_to_srgb). One
# lightness: in gray they all look alike, so an object's hue cannot be read from its gray level (as on real photos).
HUES = {"red": 30, "orange": 65, "yellow": 95, "green": 140, "teal": 195, "blue": 265, "purple": 320}
COLORS = {n: np.array(v) for n, v in {
    "red": (0.8585646099421423, 0.4817199147733004, 0.4493683771828931),
    "orange": (0.7763624593337076, 0.5357610919850961, 0.32403620969940183),
    "yellow": (0.6537037303339612, 0.5872326645219655, 0.2890659506021929),
    "green": (0.41123126734449467, 0.6423686504779726, 0.39374843554747735),
    "teal": (0.0, 0.6631337420346136, 0.6581719443514065),
    "blue": (0.28668553959339804, 0.6099798213767353, 0.8767474758066823),
    "purple": (0.7211638083156409, 0.5124824835587496, 0.776592719348732)}.items()}
STUFF_RGB = {"sky": (0.55, 0.75, 0.95), "wall": (0.62, 0.58, 0.55), "grass": (0.30, 0.55, 0.25),
             "water": (0.20, 0.35, 0.60), "sand": (0.85, 0.78, 0.55)}

def _shape_mask(kind, yy, xx, cy, cx, r):
    d = np.sqrt((dy := yy - cy) ** 2 + (dx := xx - cx) ** 2)  # the same arithmetic as ever: the world is unchanged
    if kind == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if kind == "circle":
        return d <= r
    if kind == "triangle":  # apex up
        return (dy >= -r) & (dy <= r * 0.8) & (np.abs(dx) <= (dy + r) * 0.6)
    if kind == "star":
        return d <= r * (0.6 + 0.4 * np.cos(5 * np.arctan2(dy, dx)))
    return (d <= r) & (d >= r * 0.55)  # ring

def make_scene(rng, size, max_things=6, radius=(0.1, 0.25)):
    """One scene: image (H, W, 3) uint8; things with box [x0, y0, x1, y1] (pixels), label (0-based index into THINGS),
    colour, mask; panoptic map (H, W) of segment ids (0 = void) with its segments; stuff names."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    top, bottom = rng.choice(STUFF[:2]), rng.choice(STUFF[2:])
    horizon = size * rng.uniform(0.3, 0.6) + size * 0.06 * np.sin(xx / size * rng.uniform(2, 6) + rng.uniform(0, 6))
    img, seg, segments, things = np.zeros((size, size, 3), np.float32), np.zeros((size, size), np.int32), [], []
    for name, m in [(top, yy < horizon), (bottom, yy >= horizon)]:
        img[m] = np.array(STUFF_RGB[name]) + rng.normal(0, 0.03, 3)
        seg[m] = len(segments) + 1
        segments.append(dict(id=len(segments) + 1, category_id=len(THINGS) + STUFF.index(name) + 1, iscrowd=0))
    for _ in range(rng.integers(1, max_things + 1)):
        for _attempt in range(20):  # rejection: every thing keeps most of its area visible
            kind, color, r = rng.choice(THINGS), rng.choice(list(COLORS)), size * rng.uniform(*radius)
            cy, cx = rng.uniform(r, size - r, 2)
            m = _shape_mask(kind, yy, xx, cy, cx, r)
            if m.sum() >= 12 and not any((t["mask"] & ~m).sum() < 0.6 * t["mask"].sum() for t in things):
                break
        else:
            continue
        for t in things:  # the new object occludes the older ones
            t["mask"] &= ~m
        img[m] = COLORS[color] * rng.uniform(0.95, 1.05)
        things.append(dict(label=THINGS.index(kind), name=kind, color=color, mask=m))
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    for t in things:
        ys, xs = np.nonzero(t["mask"])
        t["box"], t["area"] = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32), len(ys)
        seg[t["mask"]] = len(segments) + 1
        segments.append(dict(id=len(segments) + 1, category_id=t["label"] + 1, iscrowd=0))
    segments = [s for s in segments if (seg == s["id"]).any()]  # stuff may be hidden entirely
    for s in segments:
        ys, xs = np.nonzero(seg == s["id"])
        s["area"] = int(len(ys))
        s["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    return dict(image=(img * 255).round().astype(np.uint8), things=things, panoptic=seg, segments=segments,
                stuff=[top, bottom])

@functools.lru_cache(maxsize=4)  # --stage all: every stage of the process reuses them (16 s per 10k scenes)
def synthetic_world(split, n, size, seed=0, **scene):  # scene: make_scene's max_things, radius (a tuple)
    """n scenes of one split, kept in memory and shared by every caller (read them, never modify)."""
    sid = {"train": 1, "val": 2}[split]  # split seeds never collide
    return [make_scene(np.random.default_rng([seed, sid, i]), size, **scene) for i in range(n)]

# ---- --stage encoder: our stand-in for the paper's pretrained ViT (ImageNet-21k / Objects365, not downloadable). -----
# Through a decoder's loss alone a random tiny ViT does not learn to tell the shapes apart (results/panoptic/probes).
def pretrain_encoder(args, task, cfg, scenes, device, rank, world):
    """ViT + a linear head giving each patch token its P x P pixels' classes (void + CATEGORIES), cross-entropy.
    Writes out_dir/<task>/encoder/encoder.pt for --stage mle; short, so --resume skips it once done (no resuming)."""
    path = os.path.join(args.out_dir, task, "encoder", "encoder.pt")
    if args.resume and os.path.exists(path):
        return print0(f"{path} exists: encoder stage skipped (--resume)")
    P, C, n = cfg["patch"], len(CATEGORIES) + 1, len(scenes)
    sem = torch.from_numpy(np.stack([np.select([s["panoptic"] == x["id"] for x in s["segments"]], [  # (N, S, S)
        x["category_id"] for x in s["segments"]]).astype(np.uint8) for s in scenes]))  # pixel classes, 0 = void
    sem = rearrange(sem, "n (gh p) (gw q) -> n (gh gw) (p q)", p=P, q=P)  # each patch token's pixels
    imgs = torch.from_numpy(np.stack([s["image"] for s in scenes])).permute(0, 3, 1, 2)  # (N, 3, S, S) uint8
    raw = nn.Sequential(ViT(cfg), nn.Linear(cfg["width"], C * P * P)).to(device)  # (B, N, D) -> (B, N, C * P * P)
    model = nn.parallel.DistributedDataParallel(raw) if world > 1 else raw
    opt = make_optimizer(raw, "adamw", args.lr, args.wd, 1.0)
    log, t0 = Logger(os.path.dirname(path), rank == 0), time.time()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(imgs, sem), batch_sampler=StepSampler(
        n, args.batch_size, args.seed, 0, args.steps, rank, world))
    for step, (x, y) in enumerate(tqdm(loader, disable=rank > 0, total=args.steps, desc="encoder")):
        set_lr(opt, step, args.lr, args.warmup, args.steps, "cosine")
        x, y = (x.float() / 127.5 - 1).to(device), y.to(device).long()
        def loss():
            with autocast(device):
                return F.cross_entropy(model(x).float().unflatten(-1, (C, P * P)).transpose(1, 2), y), {}
        stats = train_step(model, opt, args, [loss], world)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            log(step + 1, s_per_step=(time.time() - t0) / (step + 1), **stats)
    if rank == 0:
        save_ckpt(path, encoder=raw[0].state_dict(), config=cfg)
    ddp_end_stage()
    return raw

# ---- pictures: a grid of labelled panels (every eval writes one) -----------------------------------------------------
def save_grid(rows, titles, path, scale=4):  # rows: lists of PIL images of one size; titles: one per column
    w, h = rows[0][0].width * scale, rows[0][0].height * scale
    grid = Image.new("RGB", (w * len(titles), 14 + h * len(rows)), "white")
    for j, t in enumerate(titles):
        ImageDraw.Draw(grid).text((j * w + 3, 1), t, fill="black")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.resize((w, h), Image.NEAREST), (j * w, 14 + i * h))
    grid.save(path)
