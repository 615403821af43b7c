"""common.py: sampling with the KV cache, the REINFORCE estimator, baselines, checkpoints, the encoder stage.
Run: python -m pytest -q tests/test_core.py"""
import argparse
import json
import os

import numpy as np
import pytest
import torch

import common
import detect


def tiny_model(vocab=40, seq_len=24, seed=0):
    torch.manual_seed(seed)
    cfg = common.model_config("tiny", 16, vocab, seq_len, bos=vocab - 1, dec_layers=2, patch=8)
    m = common.EncoderDecoder(cfg).eval()
    for p in m.parameters():  # larger weights -> peaked, varied distributions (a harder test)
        p.data.mul_(3)
    return m


@pytest.mark.parametrize("temperature,varied", [(0.0, False), (1.0, True), (0.7, True)])
def test_cached_sampling_equals_full_recompute(temperature, varied):
    m, imgs = tiny_model(), torch.randn(3, 3, 16, 16)
    noise = common.example_noise(0, 5, torch.arange(3), 4, 24)
    a = common.sample(m, imgs, 24, k=4, temperature=temperature, noise=noise, use_cache=True)
    b = common.sample(m, imgs, 24, k=4, temperature=temperature, noise=noise, use_cache=False)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=1e-4)  # float32 summation order
    # so that the equality above is not between trivial outputs: greedy gives each image's K samples as one
    # sequence (the noise unused), T > 0 draws different sequences for the same image from the noise
    distinct = [len({tuple(t) for t in a[0][i].tolist()}) for i in range(3)]
    assert (max(distinct) > 1) == varied, distinct


def test_sample_logp_equals_teacher_forced_logp():
    """The log-probs REINFORCE differentiates are those of the sampled tokens."""
    m, imgs = tiny_model(), torch.randn(2, 3, 16, 16)
    tok, logp = common.sample(m, imgs, 24, k=3, noise=common.example_noise(1, 0, torch.arange(2), 3, 24))
    tf = common.token_logp(m(imgs, tok.reshape(6, -1)), tok.reshape(6, -1))
    torch.testing.assert_close(logp.reshape(6, -1), tf, atol=1e-4, rtol=1e-4)


def test_samples_share_their_own_images_cross_attention():
    """R samples per image read the image's K/V once (grouped queries): the same logits as R copies of the image."""
    m, imgs, tok = tiny_model(), torch.randn(3, 3, 16, 16), torch.randint(0, 39, (12, 24))
    # float32 summation order (other matmul shapes): 1.3e-4 on logits up to 6.7 on one CPU model, under 1e-5 on another
    torch.testing.assert_close(m(imgs, tok), m(imgs.repeat_interleave(4, 0), tok), atol=1e-3, rtol=1e-4)
    assert not torch.allclose(m(imgs, tok), m(imgs.repeat(4, 1, 1, 1), tok), atol=1e-3)  # another image's: differs


def test_greedy_topk1_and_tiny_top_p_agree_and_end_token_stops():
    m, imgs = tiny_model(), torch.randn(2, 3, 16, 16)
    g = common.sample(m, imgs, 24, temperature=0)[0]
    assert torch.equal(common.sample(m, imgs, 24, top_k=1)[0], g)
    assert torch.equal(common.sample(m, imgs, 24, top_p=1e-6)[0], g)
    end = int(g[0, 0, 3])  # a token greedy decoding emits at position 3
    t, lp = common.sample(m, imgs, 24, temperature=0, end_token=end, pad_token=7)
    first = (t[0, 0] == end).nonzero()[0, 0]
    assert first <= 3 and (t[0, 0, first + 1:] == 7).all() and (lp[0, 0, first + 1:] == 0).all()


def test_noise_depends_on_example_not_on_batch():
    a = common.example_noise(3, 7, torch.tensor([0, 1, 2, 3]), 2, 5)
    b = common.example_noise(3, 7, torch.tensor([2, 3]), 2, 5)
    assert torch.equal(a[2:], b) and not torch.equal(a[0], a[1])
    assert not torch.equal(common.example_noise(3, 8, torch.tensor([2]), 2, 5)[0], b[0])


class Categorical(torch.nn.Module):
    """A one-token policy p = softmax(theta): the REINFORCE gradient is known in closed form."""

    def __init__(self, theta):
        super().__init__()
        self.theta = torch.nn.Parameter(theta.clone())

    def forward(self, images, tokens, allowed=None):
        return self.theta.expand(tokens.shape[0], tokens.shape[1], -1)


def reinforce_grad(kind, grad_on, K=4):
    """reinforce_loss's gradient for the Categorical policy from 200k images x K samples, and the exact one
    d/dtheta E_p[R] = p * (R - E_p[R]) of a softmax policy."""
    torch.manual_seed(0)
    theta, R = torch.tensor([0.5, -1.0, 0.0, 1.0, 0.2]), torch.tensor([1.0, 3.0, -2.0, 0.5, 2.0])
    p = theta.softmax(0)
    B, pol = 200_000, Categorical(theta)
    y = torch.multinomial(p, B * K, replacement=True).view(B, K, 1)
    loss, *_ = common.reinforce_loss(pol, torch.zeros(B), y, R[y[..., 0]], torch.ones(B, K, 1, dtype=torch.bool),
                                     kind, grad_on)
    (-loss).backward()  # loss is minus the objective
    return pol.theta.grad, p * (R - (p * R).sum())


@pytest.mark.parametrize("kind,grad_on", [("none", "first"), ("independent", "first"), ("loo", "first"),
                                          ("loo", "all"), ("independent", "all")])
def test_reinforce_gradient_is_unbiased(kind, grad_on):
    grad, analytic = reinforce_grad(kind, grad_on)
    torch.testing.assert_close(grad, analytic, atol=0.02, rtol=0)


def test_baseline_with_the_own_reward_shrinks_the_gradient_by_k_minus_1_over_k(monkeypatch):
    """The classic bug, the own reward inside the mean: r - mean_all = (K-1)/K (r - mean_others), and mean_others
    is independent of the sample, so E[grad] = (K-1)/K x the exact gradient = 0.75 x at K = 4. Its largest entry,
    0.236 (entry 4), is then off by 0.059, beyond the 0.02 above: the unbiasedness test sees this bug. Also fails
    if reinforce_loss ignored the baseline (adv = r: unbiased, off by 0.059 from the 0.75 x)."""
    monkeypatch.setattr(common, "baseline", lambda r, kind: r.mean(1, keepdim=True).expand_as(r))
    grad, analytic = reinforce_grad("loo", "first")
    torch.testing.assert_close(grad, 0.75 * analytic, atol=0.02, rtol=0)
    with pytest.raises(AssertionError):  # the unbiasedness test's check fails on it
        torch.testing.assert_close(grad, analytic, atol=0.02, rtol=0)


def test_baselines_exclude_own_reward():
    r = torch.tensor([[1.0, 2.0, 6.0]])
    assert torch.equal(common.baseline(r, "loo"), torch.tensor([[4.0, 3.5, 1.5]]))
    assert torch.equal(common.baseline(r, "independent"), torch.tensor([[2.0, 6.0, 1.0]]))
    assert torch.equal(common.baseline(r, "none"), torch.zeros(1, 3))


def test_until_end_includes_the_end_token():
    t = torch.tensor([[5, 6, 0, 0, 0], [5, 6, 7, 8, 9]])
    assert common.until_end(t, 0).tolist() == [[True, True, True, False, False], [True] * 5]


def test_checkpoint_atomic_and_checked(tmp_path, monkeypatch):
    m = tiny_model()
    path = str(tmp_path / "ckpt.pt")
    common.save_ckpt(path, task="detect", model=m.state_dict(), config=m.cfg, step=3, args={}, meta={})
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind

    def killed(obj, f, *a, **kw):  # Ctrl-C mid-write: some bytes reach the file torch.save was given, then stop
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(common.torch, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            common.save_ckpt(path, task="detect", model=m.state_dict(), config=m.cfg, step=6, args={}, meta={})
    assert common.load_ckpt(path, "detect")["step"] == 3  # the previous checkpoint is intact (run()'s promise)
    # save_ckpt leaves its partial temporary file after a kill (no cleanup); what it guarantees is that the next
    # save overwrites it and renames it into place: the new step, and no stray file
    common.save_ckpt(path, task="detect", model=m.state_dict(), config=m.cfg, step=9, args={}, meta={})
    assert common.load_ckpt(path, "detect")["step"] == 9 and os.listdir(tmp_path) == ["ckpt.pt"]
    ck = common.load_ckpt(path, "detect")
    m2 = common.build_model(ck["config"], "cpu", ck["model"])
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    with pytest.raises(common.UserError, match="task 'detect'"):
        common.load_ckpt(path, "caption")
    # hand-made ones: what a stage reads later (meta, args, step) is checked at load, not a KeyError mid-stage
    torch.save(dict(task="detect", model=m.state_dict(), config=m.cfg), tmp_path / "hand.pt")
    with pytest.raises(common.UserError, match=r"hand.pt: not a rewardtune checkpoint \(no args/meta/step\)"):
        common.load_ckpt(str(tmp_path / "hand.pt"), "detect")
    torch.save(m.state_dict(), tmp_path / "weights.pt")  # a state dict alone
    with pytest.raises(common.UserError, match=r"\(no args/config/meta/model/step/task\)"):
        common.load_ckpt(str(tmp_path / "weights.pt"), "detect")
    torch.save(dict(task="vqvae_panoptic", model={}, config={}, args={}, step=1), tmp_path / "oracle.pt")
    assert common.load_ckpt(str(tmp_path / "oracle.pt"), "vqvae_panoptic")["step"] == 1  # stage I's: no meta
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.UserError, match="bad.pt"):
        common.load_ckpt(str(tmp_path / "bad.pt"), "detect")
    other = dict(m.cfg, width=64)
    with pytest.raises(common.UserError, match="do not fit"):
        common.build_model(other, "cpu", ck["model"])


def test_timm_encoder_weights_land(tmp_path):
    """A checkpoint in timm's naming (fused qkv, class token, other grid) fills our encoder."""
    m = tiny_model()
    d, n = m.cfg["width"], len(m.encoder.blocks)
    sd = {"patch_embed.proj.weight": torch.randn(d, 3, 8, 8), "patch_embed.proj.bias": torch.randn(d),
          "cls_token": torch.randn(1, 1, d), "pos_embed": torch.randn(1, 1 + 16, d),
          "norm.weight": torch.randn(d), "norm.bias": torch.randn(d)}
    for i in range(n):
        for a, shape in [("norm1", (d,)), ("norm2", (d,)), ("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)),
                         ("mlp.fc1", (4 * d, d)), ("mlp.fc2", (d, 4 * d))]:
            sd[f"blocks.{i}.{a}.weight"], sd[f"blocks.{i}.{a}.bias"] = torch.randn(shape), torch.randn(shape[0])
    torch.save(sd, tmp_path / "vit.pth")
    common.load_timm_encoder(m, str(tmp_path / "vit.pth"))
    assert torch.equal(m.encoder.blocks[1].attn.kv.weight, sd["blocks.1.attn.qkv.weight"][d:])
    assert torch.equal(m.encoder.patch.weight, sd["patch_embed.proj.weight"])
    # our grid is 16 px / patch 8 = 2 x 2, timm's 4 x 4 after its class token (entry 0). load_timm_encoder resizes
    # with F.interpolate(mode="bilinear"), align_corners False: output pixel i samples input (i + 0.5) * 2 - 0.5 =
    # 0.5 or 2.5, midway between rows (and columns) 2i and 2i + 1, so each output is the mean of a 2 x 2 block
    grid = sd["pos_embed"][0, 1:].reshape(2, 2, 2, 2, d)  # (i, dy, j, dx): row 2i + dy, column 2j + dx
    want = grid.mean((1, 3)).reshape(1, 4, d)
    torch.testing.assert_close(m.encoder.pos.data, want, atol=1e-6, rtol=1e-6)
    # the class token took no part: it is 100x the others' size, so any weight on it would show far beyond 1e-6;
    # a checkpoint without a class token keeps all its pos_embed entries
    sd["cls_token"] = torch.full((1, 1, d), 100.0)
    sd["pos_embed"][0, 0] = 100.0
    torch.save(sd, tmp_path / "vit.pth")
    common.load_timm_encoder(m, str(tmp_path / "vit.pth"))
    torch.testing.assert_close(m.encoder.pos.data, want, atol=1e-6, rtol=1e-6)
    no_cls = {k: v for k, v in sd.items() if k != "cls_token"} | {"pos_embed": sd["pos_embed"][:, 1:]}
    torch.save(no_cls, tmp_path / "vit.pth")
    common.load_timm_encoder(m, str(tmp_path / "vit.pth"))
    torch.testing.assert_close(m.encoder.pos.data, want, atol=1e-6, rtol=1e-6)
    del sd["norm.weight"]
    torch.save(sd, tmp_path / "vit.pth")
    with pytest.raises(common.UserError, match="vit.pth"):
        common.load_timm_encoder(m, str(tmp_path / "vit.pth"))


def test_synthetic_world_is_made_once_per_process_and_only_from_its_seed():
    a = common.synthetic_world("val", 6, 32, 5)
    assert common.synthetic_world("val", 6, 32, 5) is a  # the stages of --stage all share one copy
    common.synthetic_world.cache_clear()
    np.random.seed(1), torch.manual_seed(1)  # global RNG state must not matter
    b = common.synthetic_world("val", 6, 32, 5)
    assert b is not a and all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["panoptic"], y["panoptic"])
                              for x, y in zip(a, b))
    assert not np.array_equal(common.synthetic_world("train", 6, 32, 5)[0]["image"], a[0]["image"])  # splits differ


def test_encoder_stage_learns_every_pixel_and_feeds_the_lm(tmp_path):
    """--stage encoder overfits 8 scenes to >= 95% pixel accuracy, read out in the layout written here (token
    gy * g + gx predicts pixel (gy * P + py, gx * P + px) at py * P + px of each class's chunk), so a wrong
    token order would fail; its encoder.pt then fills an LM's encoder exactly; --resume skips a finished stage."""
    scenes = common.synthetic_world("train", 8, 32, 0)
    args = argparse.Namespace(out_dir=str(tmp_path), resume=False, lr=3e-3, wd=0.0, warmup=10, steps=300,
                              batch_size=8, seed=0, clip=1.0, log_every=100)
    cfg = common.model_config("tiny", 32, 10, 8, bos=9, dec_layers=1, patch=8)
    torch.manual_seed(0)
    net = common.pretrain_encoder(args, "t", cfg, scenes, "cpu", 0, 1)
    img = torch.tensor(np.stack([s["image"] for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = net(img).view(8, 4, 4, len(common.CATEGORIES) + 1, 8, 8)  # (B, gy, gx, C, py, px)
    pred = z.argmax(3).permute(0, 1, 3, 2, 4).reshape(8, 32, 32)  # (B, gy * P + py, gx * P + px)
    truth = np.zeros((8, 32, 32), np.int64)
    for i, s in enumerate(scenes):
        for seg in s["segments"]:
            truth[i][s["panoptic"] == seg["id"]] = seg["category_id"]
    assert (pred.numpy() == truth).mean() >= 0.95
    lm = common.EncoderDecoder(cfg)
    common.load_timm_encoder(lm, str(tmp_path / "t" / "encoder" / "encoder.pt"))
    for k, v in net[0].state_dict().items():
        assert torch.equal(lm.encoder.state_dict()[k], v), k
    other = common.model_config("tiny", 64, 10, 8, bos=9, dec_layers=1, patch=8)  # another image size: 8 x 8 patches
    with pytest.raises(common.UserError, match="encoder.pt: not a ViT for this --model / image size .*pos"):
        common.load_timm_encoder(common.EncoderDecoder(other), str(tmp_path / "t" / "encoder" / "encoder.pt"))
    args.resume, before = True, os.path.getmtime(tmp_path / "t" / "encoder" / "encoder.pt")
    assert common.pretrain_encoder(args, "t", cfg, scenes, "cpu", 0, 1) is None  # done: skipped, file untouched
    assert os.path.getmtime(tmp_path / "t" / "encoder" / "encoder.pt") == before


def test_logger_on_resume_keeps_the_records_up_to_the_checkpoint(tmp_path):
    log = common.Logger(tmp_path, True)
    for step in range(1, 6):
        log(step, quiet=True, loss=float(step))
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    common.Logger(tmp_path, True, resume=3)  # the checkpoint was at step 3: steps 4-6 are run again
    assert [json.loads(r)["step"] for r in open(tmp_path / "log.jsonl")] == [1, 2, 3]
    common.Logger(tmp_path, True)  # a fresh run starts a fresh log
    assert open(tmp_path / "log.jsonl").read() == ""



@pytest.mark.parametrize("bad", ["B/x", "B/0", "Q/16", "b/16"])
def test_model_name_errors_are_user_errors(bad):
    with pytest.raises(common.UserError, match="unknown size"):
        common.model_config(bad, 224, 10, 5, 0, 2)
    assert common.model_config("B/16", 224, 10, 5, 0, 2)["patch"] == 16


# -----------------------------------------------------------------------------
# issue 20: tests that bite (each was checked to fail under a one-line mutation of common.py)
class FixedLogits(torch.nn.Module):
    """A policy whose teacher-forced logits are a fixed leaf tensor (N, L_max, V): reinforce_loss's gradient into
    each position's logits can be read off directly."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, images, tokens, allowed=None):
        return self.logits[:tokens.shape[0], :tokens.shape[1]]


def test_reinforce_loss_masks_the_tail_and_scales_by_one_over_L():
    torch.manual_seed(0)
    B, K, L, V = 2, 2, 5, 7
    pol = FixedLogits(torch.randn(B * K, 2 * L, V))
    tokens = torch.randint(0, V, (B, K, L))
    lengths = torch.tensor([[5, 3], [1, 4]])  # positions t < length were actions
    mask = torch.arange(L) < lengths[..., None]
    rewards = torch.tensor([[1.0, 3.0], [0.0, 4.0]])
    adv = torch.tensor([-2.0, 2.0, -4.0, 4.0])  # loo, K = 2: r - the other sample's reward, by hand
    loss, *_ = common.reinforce_loss(pol, torch.zeros(B), tokens, rewards, mask, "loo", "all")
    # independent: -mean_i adv_i * sum_t mask_it log p_it / L, log p from log_softmax of the same logits
    lp = torch.log_softmax(pol.logits.detach()[:, :L], -1).gather(-1, tokens.reshape(B * K, L, 1))[..., 0]
    want = -(adv * (lp * mask.reshape(B * K, L)).sum(-1)).mean() / L
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-6)
    loss.backward()
    g = pol.logits.grad[:, :L]
    m = mask.reshape(B * K, L)
    assert (g[~m] == 0).all() and (g[m].abs().sum(-1) > 1e-4).all()  # masked positions: exactly no gradient
    other = torch.where(mask, tokens, (tokens + 3) % V)  # other tokens in the masked tail: the same loss
    assert not torch.equal(other, tokens)
    assert torch.equal(common.reinforce_loss(pol, torch.zeros(B), other, rewards, mask, "loo", "all")[0], loss)
    # twice the length, the extra tail not actions: the same sum of log p over 2L positions, half the loss
    long_tok = torch.cat([tokens, torch.randint(0, V, (B, K, L))], -1)
    long_mask = torch.cat([mask, torch.zeros(B, K, L, dtype=torch.bool)], -1)
    loss2 = common.reinforce_loss(pol, torch.zeros(B), long_tok, rewards, long_mask, "loo", "all")[0]
    torch.testing.assert_close(loss2, loss / 2, atol=1e-6, rtol=1e-6)


class FixedPolicy:
    """What sample() reads of a model (cfg, memory_kv, decoder): every step's logits are `logits` (V,)."""

    def __init__(self, logits):
        self.logits, self.cfg = logits, dict(bos=0, heads=1, width=1)

    def memory_kv(self, images, repeat=1):
        return []  # no layers: no cross-attention K/V, no caches

    def decoder(self, tokens, mem_kv, caches=None, pos=0):
        return self.logits.expand(tokens.shape[0], tokens.shape[1], -1)


# logits sorted high to low; p = softmax(l / T), by hand (4 decimals):
#   T 1.0: .4161 .2284 .1385 .0929 .0563 .0378 .0207 .0093   cumsum .4161 .6445 .7830 .8759 .9322 ...
#   T 0.7: .5384 .2285 .1118 .0632 .0309 .0175 .0074 .0024
#   T 0.7, top-5 renormalised: .5534 .2349 .1150 .0649 .0318   cumsum .5534 .7883 .9033 .9682 1
LOGITS = torch.tensor([2.0, 1.4, 0.9, 0.5, 0.0, -0.4, -1.0, -1.8])


@pytest.mark.parametrize("T,top_k,top_p,kept", [
    (1.0, 0, 1.0, 8), (0.7, 0, 1.0, 8),
    (0.7, 3, 1.0, 3),  # top-k: the 3 largest, renormalised
    (0.7, 5, 0.93, 4),  # top-5 then nucleus: .9033 < .93 <= .9682 -> 4 tokens
    (1.0, 0, 0.9, 5),  # nucleus alone: .8759 < .9 <= .9322 -> 5 tokens
])
def test_sampling_frequencies_follow_tempered_truncated_softmax(T, top_k, top_p, kept):
    p = (LOGITS / T).softmax(0)
    if top_k:
        p = torch.where(torch.arange(8) < top_k, p, 0.0)
    p = p / p.sum()
    n = int((p.cumsum(0) < top_p - 1e-9).sum()) + 1  # the smallest top set with mass >= top_p
    assert min(n, 8) == kept
    p = torch.where(torch.arange(8) < kept, p, 0.0)
    p = p / p.sum()
    torch.manual_seed(0)
    N = 20000
    tok, logp = common.sample(FixedPolicy(LOGITS), torch.zeros(1), 1, k=N, temperature=T, top_k=top_k, top_p=top_p)
    freq = torch.bincount(tok.flatten(), minlength=8).double() / N
    assert (freq[kept:] == 0).all()  # truncated tokens are never drawn
    assert (freq - p).abs().max() < 0.012, (freq, p)  # binomial sd <= 0.0036 at N = 20000
    torch.testing.assert_close(logp.flatten(), LOGITS.log_softmax(0)[tok.flatten()])  # log p at temperature 1


def test_set_lr_warmup_then_constant_or_cosine_per_group_multiplier():
    opt = torch.optim.SGD([{"params": [torch.zeros(1)], "lr_mult": 1.0},
                           {"params": [torch.zeros(1)], "lr_mult": 0.1}], lr=0.0)
    def lrs(step, schedule):
        common.set_lr(opt, step, 0.2, 4, 12, schedule)  # base 0.2, warmup 4, 12 steps
        return [g["lr"] for g in opt.param_groups]
    for schedule in ["constant", "cosine"]:  # warmup 0.2 * (s + 1) / 4: 0.05, 0.1, 0.15, 0.2
        for s, want in [(0, 0.05), (1, 0.1), (3, 0.2)]:
            assert lrs(s, schedule) == pytest.approx([want, want * 0.1]), (s, schedule)
    for s in [4, 7, 11, 50]:
        assert lrs(s, "constant") == pytest.approx([0.2, 0.02])
    # cosine over the 8 steps after warmup: 0.2 * (1 + cos(pi * (s - 4) / 8)) / 2
    for s, want in [(4, 0.2), (6, 0.1 * (1 + 2 ** -0.5)), (8, 0.1), (10, 0.1 * (1 - 2 ** -0.5)), (12, 0.0),
                    (20, 0.0)]:
        assert lrs(s, "cosine") == pytest.approx([want, want * 0.1], abs=1e-12), s


def test_make_optimizer_decays_only_matrices_and_slows_the_encoder():
    m = tiny_model()
    no_decay = set()  # by module type: biases, LayerNorms, the token embedding (tied with the head), positions
    for mn, mod in m.named_modules():
        for pn, _ in mod.named_parameters(recurse=False):
            name = f"{mn}.{pn}" if mn else pn
            if pn in ("bias", "pos") or isinstance(mod, (torch.nn.LayerNorm, torch.nn.Embedding)):
                no_decay.add(name)
    names = dict(m.named_parameters())
    assert {"decoder.tok.weight", "encoder.pos", "decoder.pos", "encoder.ln.weight", "decoder.blocks.0.ln1.weight",
            "decoder.blocks.0.lnc.weight", "decoder.head.bias", "encoder.patch.bias"} <= no_decay
    assert {"encoder.patch.weight", "decoder.blocks.0.attn.q.weight", "decoder.blocks.1.cross.kv.weight",
            "decoder.blocks.0.mlp.2.weight", "encoder.blocks.3.mlp.0.weight"} <= set(names) - no_decay
    assert "decoder.head.weight" not in names  # tied: one tensor, named tok.weight
    opt = common.make_optimizer(m, "adamw", 1e-3, 0.05, 0.25)
    seen = {}
    for g in opt.param_groups:
        for p in g["params"]:
            seen[id(p)] = (g["weight_decay"], g["lr_mult"])
    assert len(seen) == len(names) == sum(len(g["params"]) for g in opt.param_groups)  # each exactly once
    for n, p in names.items():
        assert seen[id(p)] == (0.0 if n in no_decay else 0.05, 0.25 if n.startswith("encoder.") else 1.0), n


def test_micro_batches_give_the_update_of_the_whole_batch():
    """--micro_batch 2 of a batch of 4 with different token counts per example: the same SGD update as one
    closure over the batch (mle_loss's fixed denominator; train_step divides each part by the number of parts)."""
    torch.manual_seed(0)
    cfg = common.model_config("tiny", 16, 20, 8, bos=19, dec_layers=1, patch=8)
    m0 = common.EncoderDecoder(cfg).double()
    imgs, tok = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 19, (4, 8))
    w = (torch.arange(8) < torch.tensor([8, 2, 1, 3])[:, None]).double()  # 10 tokens in part 1, 4 in part 2
    args = argparse.Namespace(clip=0.0)  # clipping would hide a scale error

    def update(parts):
        m = common.EncoderDecoder(cfg).double()
        m.load_state_dict(m0.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=0.1)  # not Adam: its update hides the gradient's scale
        st = common.train_step(m, opt, args, [lambda s=s: common.mle_loss(m, imgs[s], tok[s], w[s])[::2]
                                              for s in parts], 1)
        return {k: v - m0.state_dict()[k] for k, v in m.state_dict().items()}, st

    whole, st1 = update([slice(0, 4)])
    micro, st2 = update([slice(0, 2), slice(2, 4)])
    assert max(d.abs().max() for d in whole.values()) > 1e-4  # the step moved the weights
    for k in whole:
        torch.testing.assert_close(micro[k], whole[k], atol=1e-12, rtol=1e-9, msg=k)
    assert st1["loss"] == pytest.approx(st2["loss"], rel=1e-9)  # the logged loss is the global one too


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_training_with_a_user_error(bad):
    lin, x = torch.nn.Linear(2, 1), torch.ones(1, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    args = argparse.Namespace(clip=0.0)  # no grad_norm in the statistics: the loss alone has to trip the check
    st = common.train_step(lin, opt, args, [lambda: (lin(x).sum() * 0 + 1.5, {})], 1)
    assert st == {"loss": 1.5}  # the same step with a finite loss goes through
    with pytest.raises(common.UserError, match="non-finite training statistics .*--resume"):
        common.train_step(lin, opt, args, [lambda: (lin(x).sum() * 0 + bad, {})], 1)


def test_grammar_masked_sampling_stays_in_grammar_and_returns_the_masked_logp():
    """detect's grammar: 3 boxes x [4 coordinates (or the end token 0 at a box's first slot), class, confidence].
    Tokens up to the end obey it; their log-probs are the teacher-forced ones under the same mask (temperature 1)."""
    allowed = detect.grammar(3, 5)  # (18, V), V = 1004 + 5 classes + BOS
    L, V = allowed.shape
    torch.manual_seed(0)
    m = common.EncoderDecoder(common.model_config("tiny", 16, V, L, bos=V - 1, dec_layers=2, patch=8)).eval()
    for p in m.parameters():  # peaked distributions, as tiny_model
        p.data.mul_(3)
    m.decoder.head.bias.data[0] += 6.0  # the end token likely where allowed: some samples end early, some never
    imgs = torch.randn(2, 3, 16, 16)
    noise = common.example_noise(2, 0, torch.arange(2), 8, L)
    tok, logp = common.sample(m, imgs, L, k=8, temperature=0.7, top_p=0.9, noise=noise, allowed=allowed,
                              end_token=0)
    tok, logp = tok.reshape(16, L), logp.reshape(16, L)
    live = common.until_end(tok, 0)  # up to and including the end token
    ends = live.sum(1)
    assert ends.min() < L and ends.max() == L  # both cases met: ended before the last slot, and ran to it
    assert allowed[torch.arange(L), tok][live].all()
    tf = common.token_logp(m(imgs, tok, allowed), tok)
    # 1e-5 + 1e-5 x |log p| (log p down to about -6): float32 summation order, the cache's one-query matmul
    # attention against teacher forcing's sdpa (3e-5 seen); tempered log p would be off by up to 1.0, unmasked by 8.6
    torch.testing.assert_close(logp[live], tf[live], atol=1e-5, rtol=1e-5)
    # the mask is what keeps them in grammar: the same noise without it leaves the grammar
    free = common.sample(m, imgs, L, k=8, temperature=0.7, top_p=0.9, noise=noise, end_token=0)[0].reshape(16, L)
    assert not allowed[torch.arange(L), free][common.until_end(free, 0)].all()
