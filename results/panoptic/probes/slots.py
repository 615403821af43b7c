# per GT segment: majority predicted slot and class; how often a thing shares its slot with another segment
# run: python results/panoptic/probes/slots.py STAGE2_CKPT ORACLE_CKPT
import torch
from probe_setup import load, vqvae, common
model, oracle, ds, cats, allowed, (idx, img, target, sem, inst, gt, gt_cat, gt_crowd) = load(200); c = oracle.c
C = c["classes"]
with torch.no_grad():
    codes = vqvae.encode(oracle, target, img) + 1
    g = common.sample(model, img, 256, 1, 0, allowed=allowed)[0][:, 0]
    for name, tok in [("oracle", codes), ("greedy", g)]:
        lg = vqvae.decode(oracle, tok - 1, img)
        ps, pi = lg[:, :C].argmax(1), lg[:, C:].argmax(1)
        n = slot_ok = cls_ok = coll = 0; first_slot_ok = 0; firsts = 0
        for b in range(len(img)):
            segs = [s for s in inst[b].unique().tolist() if s > 0]
            maj = {s: pi[b][inst[b] == s].mode().values.item() for s in segs}
            for s in segs:
                m = inst[b] == s
                is_thing = 1 <= sem[b][m][0] <= 5
                if not is_thing: continue
                n += 1
                slot_ok += maj[s] == s
                cls_ok += (ps[b][m] == sem[b][m]).float().mean().item() > 0.5
                coll += any(maj[t] == maj[s] for t in segs if t != s)
            firsts += 1; first_slot_ok += maj[1] == 1 if 1 in maj else 0
        print(f"{name}: things {n}, slot == canonical {slot_ok / n:.2f}, majority class right {cls_ok / n:.2f}, "
              f"shares its slot with another segment {coll / n:.2f}; segment 1 (first in centroid order) slot right {first_slot_ok / firsts:.2f}")
