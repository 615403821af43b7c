import sys, time, torch, torch.nn.functional as F
sys.path.insert(0, ".")
import common
torch.manual_seed(0)
K = int(sys.argv[1]); mode = sys.argv[2]
m = common.EncoderDecoder(common.model_config("tiny", 64, 257, 256, 0, 3, 8)).eval()
imgs, L = torch.randn(16, 3, 64, 64), 256
def attn(a, x, kv=None, cache=None, pos=None, mask=None):
    B, T, D = x.shape
    if kv is None:
        k, v = a.memory_kv(x)
        cache.index_copy_(3, pos, torch.stack([k, v]))  # write at pos (tensor)
        k, v = cache[0], cache[1]
    else:
        k, v = kv
    r = B // k.shape[0]
    q = a.q(x).view(B // r, r, T, a.h, -1).permute(0, 3, 1, 2, 4).flatten(2, 3)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s + mask
    y = s.softmax(-1) @ v
    return a.out(y.view(B // r, a.h, r, T, -1).permute(0, 2, 3, 1, 4).reshape(B, T, D))
def step(dec, tok, pos, kv, caches):
    mask = torch.where(torch.arange(L) <= pos, 0.0, float("-inf"))
    x = dec.tok(tok) + dec.pos[0].index_select(0, pos)[None]
    for i, b in enumerate(dec.blocks):
        x = x + attn(b.attn, b.ln1(x), cache=caches[i], pos=pos, mask=mask)
        x = x + attn(b.cross, b.lnc(x), kv=kv[i])
        x = x + b.mlp(b.ln2(x))
    return dec.head(dec.ln(x))[:, -1]
f = step if mode == "eager" else torch.compile(step, dynamic=False)
@torch.no_grad()
def run():
    N = 16 * K
    kv = m.memory_kv(imgs)
    caches = [torch.zeros(2, N, 4, L, 32 if False else m.cfg["width"] // m.cfg["heads"]) for _ in kv]
    tok = torch.zeros(N, 1, dtype=torch.long)
    for t in range(L):
        logits = f(m.decoder, tok, torch.tensor([t]), kv, caches)
        tok = (logits / 0.5).softmax(-1).multinomial(1)
print(m.cfg)
t0 = time.perf_counter(); run(); print("first", time.perf_counter() - t0)
ts = [(lambda a: (run(), time.perf_counter() - a)[1])(time.perf_counter()) for _ in range(3)]
print(f"{mode} K={K}: {min(ts)*1e3:.0f} ms, {min(ts)/L*1e3:.2f} ms/token")
