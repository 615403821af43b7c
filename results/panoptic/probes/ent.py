# how predictable are the oracle's codes? distinct codes on pure cells, entropy of code given (class, slot, subpos)
# run: python results/panoptic/probes/ent.py ORACLE_CKPT
import math, collections, torch
from probe_setup import load, vqvae
model, oracle, ds, cats, allowed, (idx, img, target, sem, inst, gt, gt_cat, gt_crowd) = load(300); c = oracle.c
with torch.no_grad(): codes = vqvae.encode(oracle, target, img)
key = (sem * 100 + inst)
kmin = -torch.nn.functional.max_pool2d(-key.float()[:, None], 4).flatten(1); kmax = torch.nn.functional.max_pool2d(key.float()[:, None], 4).flatten(1)
pure = kmin == kmax
sub = (torch.arange(256) // 16 % 2) * 2 + torch.arange(256) % 2
groups = collections.defaultdict(collections.Counter)
for b in range(300):
    for t in range(256):
        if pure[b, t]:
            groups[(int(kmax[b, t]), int(sub[t]))][int(codes[b, t])] += 1
n = sum(sum(g.values()) for g in groups.values())
H = sum(-sum(v * math.log(v / sum(g.values())) for v in g.values()) for g in groups.values()) / n
print(f"pure cells {n}, groups {len(groups)}, H(code | class, slot, subpos) = {H:.2f} nats; "
      f"mean distinct per group {sum(len(g) for g in groups.values()) / len(groups):.1f}")
