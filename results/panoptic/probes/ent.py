# how predictable are the oracle's codes? distinct codes on pure cells, entropy of code given (class, slot, subpos)
# run: python results/panoptic/probes/ent.py ORACLE_CKPT
import os, sys, math, collections, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../.."))
import vqvae, panoptic
oracle = vqvae.load(sys.argv[1], "panoptic", "cpu"); c = oracle.c
args = panoptic.p.parse_args(["--num_val", "300", "--num_train", "10"])
for k, v in panoptic.PRESETS["synthetic"].items():
    if getattr(args, k, None) is None: setattr(args, k, v)
args.image_size = c["image_size"]
tr, va, cats = panoptic.load_data(args)
ds = panoptic.Scenes(va, cats, c["instances"], c["image_size"])
idx, img, target, sem, inst, *_ = next(iter(torch.utils.data.DataLoader(ds, batch_size=300)))
with torch.no_grad(): codes = vqvae.encode(oracle, target, img)
key = (sem * 100 + inst)
kmin = -torch.nn.functional.max_pool2d(-key.float()[:, None], 4).flatten(1); kmax = torch.nn.functional.max_pool2d(key.float()[:, None], 4).flatten(1)
pure = kmin == kmax
sub = (torch.arange(256) // 16 % 2) * 2 + torch.arange(256) % 2
groups = collections.defaultdict(collections.Counter)
for b in range(300):
    for t in range(256):
        if pure[b, t]:
            groups[(int(kmax[b, t]), int(sub[t]))][int(codes[b, t])] += 1
n = sum(sum(g.values()) for g in groups.values())
H = sum(-sum(v * math.log(v / sum(g.values())) for v in g.values()) for g in groups.values()) / n
print(f"pure cells {n}, groups {len(groups)}, H(code | class, slot, subpos) = {H:.2f} nats; "
      f"mean distinct per group {sum(len(g) for g in groups.values()) / len(groups):.1f}")
