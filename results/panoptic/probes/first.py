# teacher-forced accuracy at the first code cell of each thing (raster order): the LM's decision points
# run: python results/panoptic/probes/first.py STAGE2_CKPT ORACLE_CKPT
import os, sys, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../.."))
import vqvae, panoptic, common
oracle = vqvae.load(sys.argv[2], "panoptic", "cpu"); c = oracle.c
ck = common.load_ckpt(sys.argv[1], "panoptic")
model = common.EncoderDecoder(ck["config"]); model.load_state_dict(ck["model"]); model.eval()
args = panoptic.p.parse_args(["--num_val", "200", "--num_train", "10"])
for k, v in panoptic.PRESETS["synthetic"].items():
    if getattr(args, k, None) is None: setattr(args, k, v)
args.image_size = c["image_size"]
tr, va, cats = panoptic.load_data(args)
ds = panoptic.Scenes(va, cats, c["instances"], c["image_size"])
allowed = vqvae.allowed_tokens(c["codebook"], "cpu")
idx, img, target, sem, inst, *_ = next(iter(torch.utils.data.DataLoader(ds, batch_size=200)))
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
