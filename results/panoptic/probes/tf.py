# greedy vs teacher-forced codes of a stage II model, decoded by the oracle: thing-pixel class accuracy, PQ counts,
# the confusion of thing classes, slots used, and greedy continued from the oracle's prefix up to the first thing cell
# run: python results/panoptic/probes/tf.py STAGE2_CKPT ORACLE_CKPT
import torch
from probe_setup import load, vqvae, panoptic, common
model, oracle, ds, cats, allowed, (idx, img, target, sem, inst, gt, gt_cat, gt_crowd) = load(100); c = oracle.c
C = c["classes"]; thing = (sem >= 1) & (sem <= 5)
with torch.no_grad():
    codes = vqvae.encode(oracle, target, img) + 1
    tf = model(img, codes, allowed).argmax(-1)
    g = common.sample(model, img, 256, 1, 0, allowed=allowed)[0][:, 0]
    # mixed: oracle codes everywhere except thing cells, where greedy's codes go
    cell_thing = torch.nn.functional.max_pool2d(thing.float()[:, None], 4).flatten(1) > 0
    mix1 = torch.where(cell_thing, g, codes)   # greedy things in oracle stuff
    mix2 = torch.where(cell_thing, codes, g)   # oracle things in greedy stuff
    for name, tok in [("oracle", codes), ("tf_argmax", tf), ("greedy", g), ("greedy things+oracle stuff", mix1), ("oracle things+greedy stuff", mix2)]:
        lg = vqvae.decode(oracle, tok - 1, img); ps = lg[:, :C].argmax(1)
        seg, cat = panoptic.segment(oracle, tok, img)
        cnt = panoptic.pq_counts(gt, gt_cat, gt_crowd, seg, cat)
        print(f"{name:30s} thing sem acc {(ps == sem)[thing].float().mean():.3f}", {k: round(float(v.double().mean()), 2) for k, v in cnt.items()})
    lg = vqvae.decode(oracle, g - 1, img); ps = lg[:, :C].argmax(1); pi = lg[:, C:].argmax(1)
    M = torch.zeros(C, C, dtype=torch.long)
    M.index_put_((sem[thing], ps[thing]), torch.ones_like(sem[thing]), accumulate=True)
    print("confusion rows GT 1-5, cols pred 0-10\n", M[1:6])
    lg = vqvae.decode(oracle, codes - 1, img); pio = lg[:, C:].argmax(1)
    print("slots used per image oracle", [len(pio[b].unique()) for b in range(8)], "greedy", [len(pi[b].unique()) for b in range(8)])
    print("GT segments", [len(inst[b].unique()) for b in range(8)])
    # prefix experiment: teacher-force oracle codes up to first thing cell, then greedy (full recompute)
    P = cell_thing.float().argmax(1)
    tok = codes.clone()
    for t in range(256):
        lgt = model(img, tok, allowed)[:, t].argmax(-1)
        tok[:, t] = torch.where(t >= P, lgt, codes[:, t])
    lg = vqvae.decode(oracle, tok - 1, img); ps = lg[:, :C].argmax(1)
    seg, cat = panoptic.segment(oracle, tok, img)
    cnt = panoptic.pq_counts(gt, gt_cat, gt_crowd, seg, cat)
    print(f"oracle prefix then greedy: thing sem acc {(ps == sem)[thing].float().mean():.3f}", {k: round(float(v.double().mean()), 2) for k, v in cnt.items()})
