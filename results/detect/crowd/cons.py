"""Is the MLE model conservative? Greedy boxes vs GT count, and what an end-token penalty buys.
usage: PYTHONPATH=. python cons.py CKPT N_IMAGES MAX_THINGS R0 R1 [bias ...]"""
import sys, torch, numpy as np, common, detect
torch.set_num_threads(2)
ck = common.load_ckpt(sys.argv[1], "detect"); m = common.build_model(ck["config"], "cpu", ck["model"]).eval()
n, mt, r0, r1 = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
biases = [float(b) for b in sys.argv[6:]] or [0.0]
meta = dict(ck["meta"], reward="recall")
items, gt = detect.load_synthetic("val", n, ck["config"]["image_size"], 0, max_things=mt, radius=(r0, r1))
ds = detect.Boxes(items, ck["config"]["image_size"])
orig = m.decoder.forward
for bias in biases:
    def dec(inp, kv, caches=None, pos=0, _b=bias):
        out = orig(inp, kv, caches, pos=pos)
        if inp.shape[1] == 1 and pos % 6 == 0:
            out = out.clone(); out[..., 0] -= _b  # penalty on the end token at a box start
        return out
    m.decoder.forward = dec
    res, rew, nb, tok = detect.predict(m, ds, meta, "cpu", n)
    met = detect.coco_eval(gt, res, [it["id"] for it in items])
    _, _, pv = detect.decode(tok, len(meta["classes"]))
    ngt = np.array([len(it["labels"]) for it in items]); npred = pv.sum(1).numpy()
    line = f"end penalty {bias:4.1f} | AP {met['AP']:.1f} AP50 {met['AP50']:.1f} AR@100 {met['AR100']:.1f} | recall reward {rew:.3f} | boxes/img {nb:.2f} (GT {ngt.mean():.2f})"
    buckets = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 12)]
    line += " | boxes/GT by GT count " + " ".join(f"{a}-{b}:{npred[(ngt>=a)&(ngt<=b)].mean()/ngt[(ngt>=a)&(ngt<=b)].mean():.2f}" for a, b in buckets if ((ngt>=a)&(ngt<=b)).any())
    print(line, flush=True)
