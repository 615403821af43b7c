# Detect probe: greedy (as eval) vs all slots forced to be boxes, scored p(class) x P(conf 2) x P(not end), and both
# re-scored by each box's true IoU (the ranking ceiling). run: PYTHONPATH=. python results/detect/probes_encoder/forced.py CKPT...
import sys, torch, common, detect, numpy as np
torch.set_num_threads(2)
N = 500
items, gt = detect.load_synthetic("val", N, 64, 0); ds = detect.Boxes(items, 64)
idx, imgs, boxes, labels = detect.collate([ds[i] for i in range(N)])
def oracle(res):
    out = []
    for d in res:
        x, y, w, h = d["bbox"]; b = 0
        for a in gt["annotations"]:
            if a["image_id"] != d["image_id"] or a["category_id"] != d["category_id"]: continue
            X, Y, W, H = a["bbox"]; iw = max(0, min(x+w, X+W) - max(x, X)); ih = max(0, min(y+h, Y+H) - max(y, Y))
            b = max(b, iw*ih / (w*h + W*H - iw*ih))
        out.append(dict(d, score=b))
    return out
r2 = lambda d: {k: round(v, 1) for k, v in d.items()}
for path in sys.argv[1:]:
    ck = common.load_ckpt(path, "detect"); m = common.build_model(ck["config"], "cpu", ck["model"]).eval()
    S, nc = ck["meta"]["max_boxes"], 5
    meta = dict(ck["meta"], reward="map")
    res, r, nb, tk = detect.predict(m, ds, meta, "cpu", N)
    print(path, "greedy", r2(detect.coco_eval(gt, res, range(N))), "boxes", nb, "oracle-rank", r2(detect.coco_eval(gt, oracle(res), range(N))))
    allowed = detect.grammar(S, nc, (2,)); allowed[0::6, 0] = False
    with torch.no_grad():
        out = []
        for i0 in range(0, N, 125):
            im = imgs[i0:i0+125]
            tok, lp = common.sample(m, im, S*6, temperature=0, allowed=allowed)
            tok = tok[:, 0]; p = lp[:, 0].view(len(im), -1, 6).exp()
            lg = m(im, tok, detect.grammar(S, nc)).float()
            p2 = lg[:, 5::6].softmax(-1)[..., 2]
            pend = lg[:, 0::6].softmax(-1)[..., 0]
            pb, pl, pv = detect.decode(tok, nc)
            for j in range(len(im)):
                it = ds.items[i0 + j]
                for s in range(S):
                    out.append(dict(image_id=it["id"], category_id=int(pl[j, s]) + 1, bbox=detect.to_xywh(pb[j, s].tolist(), it),
                                    score=float(p[j, s, 4] * p2[j, s] * (1 - pend[j, s])), pend=float(pend[j, s])))
    print("  forced 8", r2(detect.coco_eval(gt, out, range(N))), "oracle-rank", r2(detect.coco_eval(gt, oracle(out), range(N))))
    pe = np.array([o["pend"] for o in out]).reshape(N, S)
    print("  P(end) per slot (mean):", pe.mean(0).round(3), " frac slot with pend>0.5:", (pe > 0.5).mean(0).round(2))
