# teacher-forced accuracy at the first code cell of each thing (raster order): the LM's decision points
# run: python results/panoptic/probes/first.py STAGE2_CKPT ORACLE_CKPT
import torch
from probe_setup import load, vqvae
model, oracle, ds, cats, allowed, (idx, img, target, sem, inst, gt, gt_cat, gt_crowd) = load(200); c = oracle.c
with torch.no_grad():
    codes = vqvae.encode(oracle, target, img) + 1
    logits = model(img, codes, allowed)
    ok = logits.argmax(-1) == codes
    # majority instance per cell
    cell_inst = torch.nn.functional.max_pool2d(inst.float()[:, None], 4).flatten(1).long()  # any-ish
    cell_sem = torch.nn.functional.max_pool2d(sem.float()[:, None], 4).flatten(1).long()
    thing = (cell_sem >= 1) & (cell_sem <= 5)
    first = torch.zeros_like(thing)
    for b in range(len(idx)):
        seen = set()
        for t in range(256):
            if thing[b, t] and int(cell_inst[b, t]) not in seen:
                seen.add(int(cell_inst[b, t])); first[b, t] = True
    print(f"TF acc: first thing cell {ok[first].float().mean():.3f} ({int(first.sum())}), other thing cells "
          f"{ok[thing & ~first].float().mean():.3f}, stuff {ok[~thing].float().mean():.3f}")
    p = logits.softmax(-1).gather(-1, codes[..., None])[..., 0]
    print(f"p(true code): first {p[first].mean():.3f} other thing {p[thing & ~first].mean():.3f} stuff {p[~thing].mean():.3f}")
