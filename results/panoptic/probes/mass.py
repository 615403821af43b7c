# at cells inside things, under the greedy prefix: probability mass on "thing codes" vs the argmax's kind
# run: python results/panoptic/probes/mass.py STAGE2_CKPT ORACLE_CKPT
import torch
import torch.nn.functional as F
from probe_setup import load, vqvae, common
model, oracle, ds, cats, allowed, (idx, img, target, sem, inst, gt, gt_cat, gt_crowd) = load(200); c = oracle.c
thing = ((sem >= 1) & (sem <= 5)).float()
cell_thing = (F.avg_pool2d(thing[:, None], 4).flatten(1) == 1)  # (B, 256) cells fully inside a thing
V = c["codebook"]
with torch.no_grad():
    codes = vqvae.encode(oracle, target, img)  # (B, 256) 0..V-1
    cnt = torch.zeros(V, 2)
    cnt.index_put_((codes.flatten(), cell_thing.flatten().long()), torch.ones(codes.numel()), accumulate=True)
    is_thing_code = cnt[:, 1] > cnt[:, 0]
    print("codes mostly at thing cells:", int(is_thing_code.sum()), "of", V)
    for name, seq in [("teacher-forced", codes + 1), ("greedy", common.sample(model, img, 256, 1, 0, allowed=allowed)[0][:, 0])]:
        p = model(img, seq, allowed).float().softmax(-1)[..., 1:]  # (B, 256, V)
        m = (p * is_thing_code).sum(-1)[cell_thing]
        am = is_thing_code[p.argmax(-1)][cell_thing].float()
        print(f"{name}: at pure thing cells mass on thing codes {m.mean():.3f} (median {m.median():.3f}), "
              f"share with mass > 0.5 {(m > 0.5).float().mean():.3f}, argmax is a thing code {am.mean():.3f}, "
              f"max prob {p.max(-1).values[cell_thing].mean():.3f}")
