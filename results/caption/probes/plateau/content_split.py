"""Per-image CIDEr-D of the default run's greedy captions, split by whether the caption's content is exactly right
(content F1 = 1: names every (colour, shape) group in the scene and nothing else). Run from the repo root."""
import json, sys, numpy as np, torch
sys.path.insert(0, ".")
import caption
torch.set_num_threads(1)
items = caption.load_synthetic("val", 500, 64, 0, 20)
by = {it["id"]: it for it in items}
for name in ("mle", "mle_cont", "reward"):
    res = json.load(open(f"results/caption/captions_{name}.json"))
    ids = [r["image_id"] for r in res]
    gts = {i: [" ".join(caption.tokenize(x)) for x in by[i]["refs"]] for i in ids}
    _, s = caption.cider_d(gts, {r["image_id"]: [r["caption"]] for r in res})
    f1 = np.array([caption.content_metrics([r["caption"]], [by[r["image_id"]]["objects"]])["content_F1"]
                   for r in res])
    ok = f1 == 1.0
    print(f"{name:9s} all {100 * s.mean():6.1f} | content exact: {ok.mean():.3f} of captions, "
          f"CIDEr-D {100 * s[ok].mean():6.1f}"
          f" | not exact: {100 * s[~ok].mean():6.1f}")
h = caption.human_metrics(items)
print("human (first reference vs the other four):", round(h["CIDEr"], 1))
