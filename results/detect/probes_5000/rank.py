import sys, torch, common, detect, numpy as np
torch.set_num_threads(2)
ck = common.load_ckpt(sys.argv[1], "detect"); m = common.build_model(ck["config"], "cpu", ck["model"]).eval()
items, gt = detect.load_synthetic("val", 300, 64, 0); ds = detect.Boxes(items, 64)
meta = dict(ck["meta"], reward="map")
res, r, nb, tok = detect.predict(m, ds, meta, "cpu", 300)
# recompute components: p2 via teacher forcing
nc = len(meta["classes"]); S = meta["max_boxes"]
idx, imgs, _, _ = detect.collate([ds[i] for i in range(300)])
with torch.no_grad():
    lg = m(imgs, tok, detect.grammar(S, nc)).float()
p2 = lg[:, 5::6].softmax(-1)[..., 2]
pc = lg[:, 4::6].softmax(-1).gather(-1, tok[:, 4::6, None])[..., 0]
pb, pl, pv = detect.decode(tok, nc)
comp = [(p2[j][pv[j]].tolist(), pc[j][pv[j]].tolist()) for j in range(300)]
flat2 = [x for a, b in comp for x in a]; flatc = [x for a, b in comp for x in b]
assert len(flat2) == len(res)
ious = []
for d in res:
    x, y, w, h = d["bbox"]; best = 0
    for a in gt["annotations"]:
        if a["image_id"] != d["image_id"] or a["category_id"] != d["category_id"]: continue
        X, Y, W, H = a["bbox"]; iw = max(0, min(x+w, X+W) - max(x, X)); ih = max(0, min(y+h, Y+H) - max(y, Y))
        best = max(best, iw*ih / (w*h + W*H - iw*ih))
    ious.append(best)
ious = np.array(ious)
print("boxes", len(res), "p2 mean", np.mean(flat2), "corr(p2, iou)", np.corrcoef(flat2, ious)[0, 1], "corr(pc, iou)", np.corrcoef(flatc, ious)[0, 1])
for name, s in [("model", [d["score"] for d in res]), ("p2", flat2), ("pclass", flatc), ("oracle", ious)]:
    print(name, {k: round(v, 1) for k, v in detect.coco_eval(gt, [dict(d, score=float(x)) for d, x in zip(res, s)], range(300)).items()})
