# which codes does greedy decoding write at cells fully inside a thing, and what does the oracle use those codes for?
# run: python results/panoptic/probes/codes.py STAGE2_CKPT ORACLE_CKPT
import torch, collections
from probe_setup import load, vqvae, common
model, oracle, ds, cats, allowed, (idx, img, target, sem, inst, gt, gt_cat, gt_crowd) = load(100); c = oracle.c
thing = (sem >= 1) & (sem <= 5)
pure = -torch.nn.functional.max_pool2d(-thing.float()[:, None], 4).flatten(1) > 0  # cells fully inside a thing
with torch.no_grad():
    codes = vqvae.encode(oracle, target, img) + 1
    g = common.sample(model, img, 256, 1, 0, allowed=allowed)[0][:, 0]
    torch.manual_seed(0)  # the T = 1 line varies from run to run without a seed (230 and 226 distinct codes seen)
    s = common.sample(model, img, 256, 1, 1.0, allowed=allowed)[0][:, 0]
for name, t in [("oracle", codes), ("greedy", g), ("sample T=1", s)]:
    cnt = collections.Counter(t[pure].tolist())
    print(name, "pure thing cells", int(pure.sum()), "distinct codes", len(cnt), "top5", cnt.most_common(5))
# code -> class mapping of the oracle: majority class of pure cells per code
cls = torch.nn.functional.max_pool2d(sem.float()[:, None], 4).flatten(1).long()
m = collections.defaultdict(collections.Counter)
for code, k in zip(codes[pure].tolist(), cls[pure].tolist()): m[code][k] += 1
print("oracle thing codes: purity of class per code", sum(v.most_common(1)[0][1] for v in m.values()) / int(pure.sum()))
print("greedy top codes' oracle classes", [(cd, m[cd].most_common(3)) for cd, _ in collections.Counter(g[pure].tolist()).most_common(5)])
allm = collections.defaultdict(collections.Counter)
cell_sem = [torch.nn.functional.max_pool2d(((sem == k).float())[:, None], 4).flatten(1) for k in range(11)]
frac = torch.stack(cell_sem, -1)  # (B, 256, 11) fraction-ish (max) per class
for code, fr, pu in zip(codes.flatten().tolist(), frac.flatten(0, 1).tolist(), pure.flatten().tolist()):
    allm[code][tuple(k for k in range(11) if fr[k] > 0)] += 1
for cd in [211, 240, 225, 226, 61]:
    print(cd, sum(allm[cd].values()), allm[cd].most_common(4))
