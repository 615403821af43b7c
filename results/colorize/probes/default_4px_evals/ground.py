"""Vivid share of object pixels and of ground (stuff) pixels, per model (PNGs of --stage eval).
Usage: ground.py EVAL_DIR"""
import os, sys
import numpy as np, torch
from PIL import Image
sys.path.insert(0, "/work/main")
import colorize, common
ev, N = sys.argv[1], 300
scenes = common.synthetic_world("val", N, 64, 0)
thing = torch.from_numpy(np.stack([np.isin(s["panoptic"], [x["id"] for x in s["segments"]
                                   if common.CATEGORIES[x["category_id"] - 1]["isthing"]]) for s in scenes]))
stuff = torch.from_numpy(np.stack([s["panoptic"] > 0 for s in scenes])) & ~thing
models = sorted(d for d in os.listdir(ev) if os.path.isdir(os.path.join(ev, d)) and d not in ("truth", "oracle"))
for m in ["truth", "oracle"] + models:
    x = torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(ev, m, f"{i:04d}.png")).convert("RGB")))
                     .permute(2, 0, 1) for i in range(N)]).float() / 255
    v = colorize.colour_labels(x) < 7  # vivid: chroma > 10 (7: neutral)
    print(f"{m:24s} vivid share of object pixels {v[thing].float().mean():.3f}, "
          f"of ground pixels {v[stuff].float().mean():.3f}")
