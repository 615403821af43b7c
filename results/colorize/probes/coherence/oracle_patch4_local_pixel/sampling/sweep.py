"""Colorize issue 23 probe: what do the MLE model's samples look like under other sampling distributions, and where
do they lose coherence? Usage (in a clone with out/colorize/mle and out/vqvae_colorize):
  PYTHONPATH=. python sweep.py OUT_DIR [N_IMAGES]
Prints, per sampling setting (T, top_k, top_p): colorfulness, vivid, hue entropy, coherence, PSNR over the first N
held-out scenes (one sample per image, the eval's noise), and for T = 1 the coherence loss split by cell kind."""
import sys
import torch
import numpy as np
import common
import colorize
import vqvae

out_dir, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 300
torch.manual_seed(0)
oracle = vqvae.load(f"{out_dir}/vqvae_colorize/ckpt.pt", "colorize", "cpu")
S = oracle.c["image_size"]
va = colorize.Photos(colorize.load_synthetic("val", 300, S, 0), S)
ck = common.load_ckpt(f"{out_dir}/colorize/mle/ckpt.pt", "colorize")
model = common.build_model(ck["config"], "cpu", ck["model"], "mle", S).eval()
segs = colorize.segment_maps(va, n)
allowed = vqvae.allowed_tokens(model.cfg["vocab"] - 1, "cpu")


@torch.no_grad()
def run(T, top_k=0, top_p=1.0):
    imgs, truth, toks = [], [], []
    for idx, gray, rgb in torch.utils.data.DataLoader(torch.utils.data.Subset(va, range(n)), batch_size=50):
        noise = common.example_noise(0, 0, idx, 1, 256)
        tok, _ = common.sample(model, gray, 256, 1, T, top_k, top_p, noise=noise, allowed=allowed)
        imgs.append(colorize.colours(oracle, tok, gray)[:, 0].float())
        truth.append((rgb + 1) / 2)
        toks.append(tok[:, 0])
    return torch.cat(imgs), torch.cat(truth), torch.cat(toks)


def cell_split(images, segments, g=16):
    """Pixels whose colour label differs from their segment's most common label, split by where they are: in a
    cell (S/g px square) that lies inside one segment, or in a cell that straddles a boundary. -> shares."""
    lab = colorize.colour_labels(images)  # (N, S, S)
    N, H, W = lab.shape
    c = H // g
    wrong = torch.zeros_like(lab, dtype=torch.bool)
    for i in range(N):
        for s in segments[i].unique():
            if s == 0:
                continue
            m = segments[i] == s
            major = lab[i][m].mode().values
            wrong[i] |= m & (lab[i] != major)
    seg_cells = segments.long().view(N, g, c, g, c).permute(0, 1, 3, 2, 4).flatten(3)  # (N, g, g, c*c)
    mixed = (seg_cells != seg_cells[..., :1]).any(-1)  # (N, g, g) the cell straddles a boundary
    mixed_px = mixed.repeat_interleave(c, 1).repeat_interleave(c, 2)
    w = wrong.float()
    return dict(wrong_px=w.mean().item(), wrong_in_inside_cells=(w * ~mixed_px).sum().item() / max(1.0, w.sum().item()),
                inside_cell_px=(~mixed_px).float().mean().item(),
                wrong_rate_inside=(w * ~mixed_px).sum().item() / (~mixed_px).sum().item(),
                wrong_rate_boundary=(w * mixed_px).sum().item() / mixed_px.sum().item())


def fmt(d):
    return " ".join(f"{k} {v:.3f}" for k, v in d.items())


for T, k, p in [(1.0, 0, 1.0), (1.0, 0, 0.95), (1.0, 0, 0.9), (1.0, 0, 0.8), (1.0, 0, 0.6), (1.0, 5, 1.0),
                (1.0, 2, 1.0), (0.9, 0, 1.0), (0.8, 0, 1.0)]:
    x, truth, tok = run(T, k, p)
    m = colorize.summarize(colorize.image_metrics(x, truth, segs))
    print(f"T {T} top_k {k} top_p {p}: " + fmt({k2: v for k2, v in m.items() if v is not None}), flush=True)
    if (T, k, p) == (1.0, 0, 1.0):
        print("  T=1 pixels off their segment's colour: " + fmt(cell_split(x, segs)), flush=True)
        recon = []
        with torch.no_grad():
            for _, gray, rgb in torch.utils.data.DataLoader(torch.utils.data.Subset(va, range(n)), batch_size=50):
                recon.append(colorize.colours(oracle, vqvae.encode(oracle, rgb, gray)[:, None] + 1, gray)[:, 0])
        print("  oracle pixels off their segment's colour: " + fmt(cell_split(torch.cat(recon), segs)), flush=True)
        print("  truth: " + fmt(cell_split(truth, segs)), flush=True)
