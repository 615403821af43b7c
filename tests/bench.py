"""Benchmark: prints a table of speed targets (targets, not test assertions).
Run: python tests/bench.py [--batch 32] [--repeat 3]"""
import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import caption  # noqa: E402
import colorize  # noqa: E402
import detect  # noqa: E402
import panoptic  # noqa: E402
import vqvae  # noqa: E402

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--batch", type=int, default=32, help="images per step")
p.add_argument("--repeat", type=int, default=3, help="timed repetitions: best per part, median ratio of the pairs")
args = p.parse_args()
torch.manual_seed(0)


def best(f, n=args.repeat):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def paired(f_mle, f_step, n=args.repeat):
    """An MLE step and a reward step back to back, n times: the median of their ratio, and its range. The parts' own
    best-of-n are each timed at another moment, so their sum / the MLE step carries the machine's drift (3.7x-4.8x
    for one panoptic row in three runs: results/panoptic/probes/bench_spread.txt); a pair sees the same machine."""
    r = []
    for _ in range(n):
        t0 = time.perf_counter()
        f_mle()
        t1 = time.perf_counter()
        f_step()
        r.append((time.perf_counter() - t1) / (t1 - t0))
    return sorted(r)[len(r) // 2], min(r), max(r)


rows = []  # (what, measured, target, met)

# 1. sampling: KV cache vs full recompute, short and long sequences (detect's COCO length is 600)
for L, b in [(48, args.batch), (600, 4)]:
    cfg = common.model_config("tiny", 64, 1010, L, 1009, 4, 8)
    m = common.EncoderDecoder(cfg).eval()
    imgs = torch.randn(b, 3, 64, 64)
    fast = best(lambda: common.sample(m, imgs, L))
    slow = best(lambda: common.sample(m, imgs, L, use_cache=False), n=1)
    rows.append((f"sampling {L} tokens x {b}: cache vs recompute (tokens/s)",
                 f"{b * L / fast:,.0f} vs {b * L / slow:,.0f} = {slow / fast:.1f}x",
                 ">= 10x at 600" if L == 600 else "",
                 "yes" if L != 600 or slow / fast >= 10 else "NO"))

# 2. the detection reward step vs the MLE step on the same batch (synthetic preset shapes)
B, K, S = args.batch, 2, 8
items = detect.load_synthetic("val", B, 64, 0)[0]
ds = detect.Boxes(items, 64)
idx, imgs, boxes, labels = detect.collate([ds[i] for i in range(B)])
cfg = common.model_config("tiny", 64, detect.CLS0 + 6, S * 6, detect.CLS0 + 5, 4, 8)
m = common.EncoderDecoder(cfg)
opt = torch.optim.AdamW(m.parameters(), 1e-4)
allowed = detect.grammar(S, 5)
gt = torch.stack([detect.encode(b, l, S) for b, l in zip(boxes, labels)])
gb, gl = detect.gt_arrays(boxes, labels, S)
batch = dict(gt_boxes=gb, gt_labels=gl, class_weights=[1.0] * 5)


def mle_step():
    common.mle_loss(m, imgs, gt, common.until_end(gt, 0).float(), allowed)[0].backward()
    opt.step()
    opt.zero_grad()


t_mle = best(mle_step)
# a model that emits boxes until the last slot (the tuned model's regime, the slow case)
tok, _ = common.sample(m, imgs, S * 6, K, allowed=allowed, end_token=0)
tok = tok.clone()
tok[..., 0::6] = tok[..., 0::6].clamp(min=3)
t_sample = best(lambda: common.sample(m, imgs, S * 6, K, allowed=allowed, end_token=0))
t_reward = best(lambda: detect.reward_map(tok, batch))


def fwd_bwd():
    r, _ = detect.reward_map(tok, batch)
    iou = detect.match(tok, batch, 0.5, batch["class_weights"])[2]  # the confidence target, as detect.train
    loss, logits, t, _, _ = common.reinforce_loss(m, imgs, tok, r, common.until_end(tok, 0), "loo", "first", allowed)
    (loss + 0.3 * detect.conf_loss(logits, t, iou[:, :1].reshape(B, -1), 5)).backward()
    opt.step()
    opt.zero_grad()


t_fb = best(fwd_bwd) - t_reward
t_step = t_sample + t_reward + t_fb
ratio, lo, hi = paired(mle_step, lambda: (common.sample(m, imgs, S * 6, K, allowed=allowed, end_token=0), fwd_bwd()))
rows.append((f"detect reward (map): {B * K} samples x {S} boxes", f"{B * K / t_reward:,.0f} items/s, "
             f"{100 * t_reward / t_step:.1f}% of the step", "<= 5% of the step",
             "yes" if t_reward / t_step <= .05 else "NO"))
rows.append((f"detect reward step K={K} (sample {t_sample * 1e3:.0f} + reward {t_reward * 1e3:.0f} + fwd/bwd "
             f"{t_fb * 1e3:.0f} ms) vs MLE step {t_mle * 1e3:.0f} ms; paired: median of {args.repeat} (range)",
             f"{ratio:.2f}x ({lo:.2f}-{hi:.2f}; parts: {t_step / t_mle:.2f}x)", "<= 3x", "yes" if ratio <= 3 else "NO"))
# 3. the CIDEr-D reward (token ids, references once per image) vs pycocoevalcap on the same captions
B, K = args.batch, 8
items = caption.load_synthetic("val", B, 64, 0)
vocab = caption.build_vocab(items, 1)
stoi = {w: i for i, w in enumerate(vocab)}
refs = [[caption.encode(caption.tokenize(r), stoi, 20).tolist() for r in it["refs"]] for it in items]
scorer = caption.CiderD([[t[:t.index(caption.EOS) + 1] for t in r] for r in refs], len(vocab))
rt, nref = caption.ref_batch(items, torch.arange(B), stoi, 20)
hyp = torch.randint(4, len(vocab), (B, K, 21))
hyp[..., 10] = caption.EOS
t_ours = best(lambda: caption.reward_cider(hyp, dict(cider=scorer, refs=rt, nref=nref)))
try:
    from pycocoevalcap.cider.cider import Cider
    gts = {(i, k): [" ".join(caption.tokenize(r)) for r in items[i]["refs"]] for i in range(B) for k in range(K)}
    res = {(i, k): [caption.decode(hyp[i, k], vocab)] for i in range(B) for k in range(K)}
    t_ref = best(lambda: Cider().compute_score(gts, res))
    measured = f"{B * K / t_ours:,.0f} vs {B * K / t_ref:,.0f} items/s = {t_ref / t_ours:.1f}x"
    met = t_ref / t_ours >= 10
except ImportError:
    measured, met = f"{B * K / t_ours:,.0f} items/s (pycocoevalcap not installed)", None
rows.append((f"caption reward (CIDEr-D): {B} images x {K} samples x 5 refs, ours vs pycocoevalcap", measured,
             ">= 10x", {True: "yes", False: "NO", None: "?"}[met]))
# 4. UViM tasks (synthetic presets, untrained weights: the timing is the same): the reward step is sample 256
# codes -> the frozen oracle decodes them -> reward -> one forward/backward; the reward's share of it
B, K = args.batch // 2, 2
vq = {k: v for k, v in vqvae.PRESETS["synthetic/panoptic"].items() if k in (  # the preset's oracle architecture
    "image_size", "patch", "width", "depth", "heads", "codebook", "code_dim", "instances", "local", "pixel")}
C = len(common.CATEGORIES) + 1
oracle = vqvae.VQVAE(dict(vq, out_chans=C + 16, classes=C)).eval().requires_grad_(False)
ds = panoptic.Scenes(common.synthetic_world("val", B, 64, 0), common.CATEGORIES, 16, 64)
idx, imgs, target, _, _, gt, gt_cat, gt_crowd = torch.utils.data.default_collate([ds[i] for i in range(B)])
m = common.EncoderDecoder(common.model_config("tiny", 64, vq["codebook"] + 1, 256, 0, 3, 8))
opt = torch.optim.AdamW(m.parameters(), 1e-4)
allowed = vqvae.allowed_tokens(vq["codebook"], "cpu")
def uvim_mle_step():
    common.mle_loss(m, imgs, vqvae.encode(oracle, target, imgs) + 1, torch.ones(B, 256))[0].backward()


t_mle = best(uvim_mle_step)
t_sample = best(lambda: common.sample(m, imgs, 256, K, allowed=allowed))  # best of --repeat, as the rest
tok, _ = common.sample(m, imgs, 256, K, allowed=allowed)
rep = imgs.repeat_interleave(K, 0)
t_decode = best(lambda: panoptic.segment(oracle, tok.flatten(0, 1), rep))
seg, cat = panoptic.segment(oracle, tok.flatten(0, 1), rep)
pred, gtb = (seg.view(B, K, 64, 64), cat.view(B, K, -1)), dict(gt=gt, gt_cat=gt_cat, gt_crowd=gt_crowd)
t_reward = best(lambda: panoptic.reward_pq(pred, gtb))
r, _ = panoptic.reward_pq(pred, gtb)
t_fb = best(lambda: common.reinforce_loss(m, imgs, tok, r, torch.ones_like(tok, dtype=torch.bool), "loo", "all",
                                          allowed)[0].backward())
t_step = t_sample + t_decode + t_reward + t_fb


def panoptic_step():  # the four parts above in one go
    t, _ = common.sample(m, imgs, 256, K, allowed=allowed)
    sg, ct = panoptic.segment(oracle, t.flatten(0, 1), rep)
    rr, _ = panoptic.reward_pq((sg.view(B, K, 64, 64), ct.view(B, K, -1)), gtb)
    common.reinforce_loss(m, imgs, t, rr, torch.ones_like(t, dtype=torch.bool), "loo", "all", allowed)[0].backward()


ratio, lo, hi = paired(uvim_mle_step, panoptic_step)
rows.append((f"panoptic reward (pq): {B * K} samples of 64 x 64", f"{B * K / t_reward:,.0f} items/s, "
             f"{100 * t_reward / t_step:.1f}% of the step", "<= 10% of the step",
             "yes" if t_reward / t_step <= .1 else "NO"))
rows.append((f"panoptic reward step K={K} (sample {t_sample * 1e3:.0f} ms = {100 * t_sample / t_step:.0f}% + oracle "
             f"decode {t_decode * 1e3:.0f} + reward {t_reward * 1e3:.0f} + fwd/bwd {t_fb * 1e3:.0f} ms) vs MLE step "
             f"{t_mle * 1e3:.0f} ms; paired: median of {args.repeat} (range)",
             f"{ratio:.2f}x ({lo:.2f}-{hi:.2f}; parts: {t_step / t_mle:.2f}x)", "<= 3.5x",
             "yes" if ratio <= 3.5 else "NO"))
col = torch.rand(B, K, 3, 64, 64)
t_col = best(lambda: colorize.reward_colorfulness(col, {}))
rows.append((f"colorize reward (colorfulness): {B * K} images of 64 x 64", f"{B * K / t_col:,.0f} items/s, "
             f"{100 * t_col / (t_step - t_reward + t_col):.1f}% of the step", "", ""))
rows.append(("peak memory (max RSS)", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", "", ""))

print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}\n")
print("| what | measured | target | met |\n|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
