# Does stage II fail because its encoder cannot see the shapes? Pretrain the LM's encoder (tiny ViT, patch 8, 64 px)
# on dense per-pixel classes of the synthetic training scenes, save it in timm naming for `panoptic.py --init_encoder`,
# and report its held-out per-pixel class accuracy on thing pixels.
# run: python results/panoptic/probes/seg_pretrain.py OUT.pt STEPS
import sys, time, torch
import torch.nn.functional as F
from probe_setup import panoptic, common

out, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
cats = common.CATEGORIES
tr, va = (panoptic.Scenes(common.SyntheticWorld(split, n, 64, 0).scenes, cats, 16, 64)
          for split, n in [("train", 10000), ("val", 300)])
C = tr.C  # classes incl. void
cfg = common.model_config("tiny", 64, 257, 256, 0, 3, 8)
enc, P = common.ViT(cfg), cfg["patch"]
head = torch.nn.Linear(cfg["width"], C * P * P)  # each patch token predicts the classes of its 8 x 8 pixels
opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.05)


def logits(img):  # (B, 3, 64, 64) -> (B, C, 64, 64)
    B, g = img.shape[0], 64 // P
    x = head(enc(img)).view(B, g, g, C, P, P)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, C, 64, 64)


loader = torch.utils.data.DataLoader(tr, batch_size=32, shuffle=True, drop_last=True)
t0, step = time.time(), 0
while step < steps:
    for _, img, _, sem, *_ in loader:
        for gr in opt.param_groups:
            gr["lr"] = 1e-3 * min(1, (step + 1) / 100) * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159)).item())
        loss = F.cross_entropy(logits(img), sem)
        opt.zero_grad(); loss.backward(); opt.step(); step += 1
        if step % 250 == 0 or step == steps:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
        if step == steps:
            break
with torch.no_grad():
    _, img, _, sem, *_ = next(iter(torch.utils.data.DataLoader(va, batch_size=300)))
    pred = logits(img).argmax(1)
    thing = (sem >= 1) & (sem <= 5)
    print(f"held-out pixel class accuracy: thing pixels {(pred == sem)[thing].float().mean():.3f}, "
          f"stuff pixels {(pred == sem)[~thing & (sem > 0)].float().mean():.3f}")
sd = {"patch_embed.proj.weight": enc.patch.weight, "patch_embed.proj.bias": enc.patch.bias, "pos_embed": enc.pos,
      "norm.weight": enc.ln.weight, "norm.bias": enc.ln.bias}
for i, b in enumerate(enc.blocks):  # our names -> timm's (q and kv fused into qkv)
    p = f"blocks.{i}."
    for ours, timm in [(b.ln1, "norm1"), (b.ln2, "norm2"), (b.attn.out, "attn.proj"), (b.mlp[0], "mlp.fc1"),
                       (b.mlp[2], "mlp.fc2")]:
        sd[p + timm + ".weight"], sd[p + timm + ".bias"] = ours.weight, ours.bias
    sd[p + "attn.qkv.weight"] = torch.cat([b.attn.q.weight, b.attn.kv.weight])
    sd[p + "attn.qkv.bias"] = torch.cat([b.attn.q.bias, b.attn.kv.bias])
torch.save({k: v.detach().clone() for k, v in sd.items()}, out)
print("saved", out)
