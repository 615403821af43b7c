# Greedy diagnosis of a detect MLE checkpoint on 300 held-out scenes: boxes, IoU, class, coverage, pycocotools with the
# model's scores and with the true IoU as score. run: PYTHONPATH=. python results/detect/probes_encoder/diag.py CKPT
import sys, torch, common, detect
torch.set_num_threads(2)
ck = common.load_ckpt(sys.argv[1], "detect"); m = common.build_model(ck["config"], "cpu", ck["model"]).eval()
N = 300
items, gt = detect.load_synthetic("val", N, 64, 0); ds = detect.Boxes(items, 64)
idx, imgs, boxes, labels = detect.collate([ds[i] for i in range(N)])
S = ck["meta"]["max_boxes"]
tok, lp = common.sample(m, imgs, S*6, temperature=0, allowed=detect.grammar(S, 5, (2,)), end_token=0)
pb, pl, pv = detect.decode(tok[:, 0], 5)
gb, gl = detect.gt_arrays(boxes, labels, S)
iou = detect.box_iou(pb, gb) * (gl >= 0)[:, None, :]
best, arg = iou.max(-1)
cls_ok = (pl == torch.gather(gl, 1, arg))
v = pv
print("boxes/img", v.sum(1).float().mean().item(), "gt/img", (gl>=0).sum(1).float().mean().item())
print("mean best IoU", best[v].mean().item(), "frac IoU>0.5", (best[v] > 0.5).float().mean().item(), "frac IoU>.75", (best[v] > 0.75).float().mean().item(), "class right|IoU>.5", cls_ok[v & (best > 0.5)].float().mean().item())
# GT recall: GT with any pred IoU>0.5 (any class) / same class
gi = (detect.box_iou(pb, gb) * v[:, :, None])  # (B,P,G)
gv = gl >= 0
print("GT covered IoU>.5 any class", (gi.max(1).values > 0.5)[gv].float().mean().item(),
      "same class", ((gi * (pl[:, :, None] == gl[:, None, :])).max(1).values > 0.5)[gv].float().mean().item())
meta = dict(ck["meta"], reward="map")
res, r, nb, tk = detect.predict(m, ds, meta, "cpu", N)
print("model scores", detect.coco_eval(gt, res, range(N)))
out = []
for d in res:
    x, y, w, h = d["bbox"]; b = 0
    for a in gt["annotations"]:
        if a["image_id"] != d["image_id"] or a["category_id"] != d["category_id"]: continue
        X, Y, W, H = a["bbox"]; iw = max(0, min(x+w, X+W) - max(x, X)); ih = max(0, min(y+h, Y+H) - max(y, Y))
        b = max(b, iw*ih / (w*h + W*H - iw*ih))
    out.append(dict(d, score=b))
print("oracle IoU scores", detect.coco_eval(gt, out, range(N)))
