"""Why does held-out CIDEr-D fall after 300 reward steps while the sampled training reward keeps rising?
Greedy captions of each checkpoint scored four ways: document frequencies from the held-out set (the metric) or from
the 10000 training scenes (the reward), EOS as a word (the reward) or not (the metric); and the same on 500 training
scenes. Usage: python capdiag.py NAME=CKPT ... (run from the repo root, synthetic preset)."""
import sys, torch
sys.path.insert(0, ".")
import caption, common
torch.set_num_threads(1)
tr_items = caption.load_synthetic("train", 10000, 64, 0)
va_items = caption.load_synthetic("val", 500, 64, 0)
rows = []
for arg in sys.argv[1:]:
    name, path = arg.split("=")
    ck = common.load_ckpt(path, "caption")
    meta = ck["meta"]
    stoi, L = {w: i for i, w in enumerate(meta["itos"])}, meta["max_len"]
    enc = lambda s: caption.encode(caption.tokenize(s), stoi, L).tolist()
    upto = lambda t, eos: t[:t.index(caption.EOS) + (1 if eos else 0)]
    model = common.build_model(ck["config"], "cpu", ck["model"], path)
    out = {}
    for split, items in (("val", va_items), ("train", tr_items[:500])):
        ds = caption.Images(items, 64)
        m, res = caption.evaluate_model(model, ds, meta, "cpu", 500)
        hyps = {r["image_id"]: enc(r["caption"]) for r in res}
        for dfname, dfitems in (("evaldf", items), ("traindf", tr_items)):
            for eos in (False, True):
                refs_df = [[upto(enc(x), eos) for x in it["refs"]] for it in dfitems]
                cd = caption.CiderD(refs_df, len(meta["itos"]))
                refs = [[upto(enc(x), eos) for x in it["refs"]] for it in items]
                R = max(len(r) for r in refs)
                rt = caption.pad([s for r in refs for s in r + [[]] * (R - len(r))]).view(len(refs), R, -1)
                hy = caption.pad([upto(hyps[it["id"]], eos) for it in items])
                s = cd.score(hy, rt, torch.arange(len(items)), torch.tensor([len(r) for r in refs]))
                out[f"{split}_{dfname}_{'eos' if eos else 'noeos'}"] = 100 * s.mean().item()
        out[f"{split}_metric"] = m["CIDEr"]
    rows.append((name, out))
    print(name, {k: round(v, 1) for k, v in out.items()}, flush=True)
