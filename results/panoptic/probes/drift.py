# greedy vs the oracle's codes: where does greedy first differ, how many cells decode to things, and maps of
# thing cells (ground truth | greedy decoded by the oracle) for three scenes
# run: python results/panoptic/probes/drift.py STAGE2_CKPT ORACLE_CKPT
import torch
from probe_setup import load, vqvae, common
model, oracle, ds, cats, allowed, (idx, img, target, sem, inst, gt, gt_cat, gt_crowd) = load(100); c = oracle.c
C = c["classes"]
with torch.no_grad():
    codes = vqvae.encode(oracle, target, img) + 1
    g = common.sample(model, img, 256, 1, 0, allowed=allowed)[0][:, 0]
    lg_tf = model(img, codes, allowed); lg_g = model(img, g, allowed)
    print("greedy == argmax TF on own sequence:", (lg_g.argmax(-1) == g).float().mean().item())
    cell_sem = torch.nn.functional.max_pool2d(((sem >= 1) & (sem <= 5)).float()[:, None], 4).flatten(1) > 0
    # "thing-ness" of a code: decode single code? use oracle decode of the greedy seq: sem of cell
    def cellthing(tok):
        lg = vqvae.decode(oracle, tok - 1, img); ps = lg[:, :C].argmax(1)
        return torch.nn.functional.max_pool2d(((ps >= 1) & (ps <= 5)).float()[:, None], 4).flatten(1) > 0
    ct_o, ct_g = cellthing(codes), cellthing(g)
    print("cells with GT thing:", cell_sem.float().mean().item(), "oracle codes thing cells:", ct_o.float().mean().item(),
          "greedy thing cells:", ct_g.float().mean().item())
    eq = (g == codes)
    print("greedy==oracle code acc:", eq.float().mean().item())
    first_diff = (~eq).float().argmax(1)
    first_thing = cell_sem.float().argmax(1)
    print("mean first diff pos", first_diff.float().mean().item(), "mean first thing pos", first_thing.float().mean().item())
    for b in range(3):
        print("image", b)
        gs = cell_sem[b].view(16, 16); gg = ct_g[b].view(16, 16)
        for r in range(16):
            print("".join("#" if x else "." for x in gs[r].tolist()), "  ", "".join("#" if x else "." for x in gg[r].tolist()))
