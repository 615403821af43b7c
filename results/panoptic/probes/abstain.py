# PQ of greedy segmentations as is, and with every predicted thing segment made void (abstaining on things)
# run: python results/panoptic/probes/abstain.py STAGE2_CKPT ORACLE_CKPT
from probe_setup import load, panoptic
model, oracle, ds, cats, allowed, (idx, img, target, sem, inst, gt, gt_cat, gt_crowd) = load(300); c = oracle.c
preds = panoptic.predict(model, oracle, ds, "cpu", 300, 0)
def show(name, pr):
    r = panoptic.pq_in_memory(pr, ds)
    print(name, {g: round(r[g]["pq"], 1) for g in r}, {g: round(r[g]["sq"], 1) for g in r})
show("greedy", preds)
thing_ids = {x["id"] for x in cats if x["isthing"]}
ab = []
for sg, pc in preds:
    sg = sg.copy()
    for q, cid in list(pc.items()):
        if cid in thing_ids:
            sg[sg == q] = 0
    ab.append((sg, {q: cid for q, cid in pc.items() if cid not in thing_ids}))
show("abstain things", ab)
