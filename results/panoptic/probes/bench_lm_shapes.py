"""Issue 22's ratio (reward step K=2 / MLE step, paired median) for other LM shapes: codes per image L, decoder
depth. Simplified step: no oracle encoding in the MLE step, no oracle decoding or PQ in the reward step (random
rewards); compare its L = 256, 3-layer row with tests/bench.py's faithful row (bench_paired.txt)."""
import sys, time, torch
sys.path.insert(0, "/work/main")
import common
torch.manual_seed(0)
B, K, rep = 16, 2, int(sys.argv[1]) if len(sys.argv) > 1 else 5
imgs = torch.randn(B, 3, 64, 64)

def ratio(L, dec, width_model="tiny"):
    m = common.EncoderDecoder(common.model_config(width_model, 64, 257, L, 0, dec, 8))
    opt = torch.optim.AdamW(m.parameters(), 1e-4)
    gt = torch.randint(1, 257, (B, L))
    def mle():
        common.mle_loss(m, imgs, gt, torch.ones(B, L))[0].backward(); opt.zero_grad()
    def step():
        t, _ = common.sample(m, imgs, L, K)
        r = torch.rand(B, K)
        common.reinforce_loss(m, imgs, t, r, torch.ones_like(t, dtype=torch.bool), "loo", "all")[0].backward()
        opt.zero_grad()
    mle(); step()
    rs, ms, ss = [], [], []
    for _ in range(rep):
        t0 = time.perf_counter(); mle(); t1 = time.perf_counter(); step(); t2 = time.perf_counter()
        rs.append((t2 - t1) / (t1 - t0)); ms.append(t1 - t0); ss.append(t2 - t1)
    rs.sort()
    return rs[len(rs) // 2], rs[0], rs[-1], sorted(ms)[len(ms) // 2], sorted(ss)[len(ss) // 2]

print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {B} images x K={K}, median of {rep} pairs")
print("| codes L | decoder layers | MLE step ms | reward step ms | ratio (range) |\n|---|---|---|---|---|")
for L, dec in [(256, 3), (256, 6), (128, 3), (64, 3), (256, 2), (64, 6)]:
    r, lo, hi, m, s = ratio(L, dec)
    print(f"| {L} | {dec} | {m * 1e3:.0f} | {s * 1e3:.0f} | {r:.2f}x ({lo:.2f}-{hi:.2f}) |", flush=True)
