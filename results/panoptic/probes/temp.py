# run: python results/panoptic/probes/temp.py STAGE2_CKPT ORACLE_CKPT
# sampled PQ rewards at several temperatures vs greedy: is there a learning signal for things?
import torch
from probe_setup import load, panoptic, common
model, oracle, ds, cats, allowed, (idx, img, target, sem, inst, gt, gt_cat, gt_crowd) = load(64); c = oracle.c
thing_gt = torch.where((gt_cat >= 1) & (gt_cat <= 5), gt_cat, -1)
K = 8
with torch.no_grad():
    for T, topk, ms in [(0, 0, 0), (0.3, 0, 0), (0.5, 0, 0), (0.7, 0, 0), (1.0, 0, 0), (1.0, 3, 0), (0, 0, 16),
                      (0.7, 0, 16), (1.0, 0, 16), (1.0, 0, 32)]:
        torch.manual_seed(0)
        k = 1 if T == 0 else K
        tok = common.sample(model, img, 256, k, T, top_k=topk, allowed=allowed)[0].flatten(0, 1)
        im = img.repeat_interleave(k, 0)
        seg, cat = panoptic.segment(oracle, tok, im, ms)
        rep = lambda x: x.repeat_interleave(k, 0)
        cnt = panoptic.pq_counts(rep(gt), rep(gt_cat), rep(gt_crowd), seg, cat)
        ct = panoptic.pq_counts(rep(gt), rep(thing_gt), rep(gt_crowd), seg, cat)  # things only
        r = (cnt["iou"] - 0.3 * cnt["fp"]).view(-1, k).float()  # panoptic.reward_pq's formula
        print(f"T {T} top_k {topk} min_seg {ms}: reward {r.mean():.3f} best-of-K {r.max(1).values.mean():.3f} std-in-image {r.std(1).mean() if k > 1 else 0:.3f}"
              f" tp {cnt['tp'].double().mean():.2f} fp {cnt['fp'].double().mean():.2f} thing tp {ct['tp'].double().mean():.3f}"
              f" imgs with a thing tp in some sample {(ct['tp'].view(-1, k) > 0).any(1).float().mean():.2f}", flush=True)
