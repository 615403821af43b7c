"""common.py: sampling with the KV cache, the REINFORCE estimator, baselines, checkpoints, the encoder stage.
Run: python -m pytest -q tests/test_core.py"""
import argparse
import json
import os

import numpy as np
import pytest
import torch

import common


def tiny_model(vocab=40, seq_len=24, seed=0):
    torch.manual_seed(seed)
    cfg = common.model_config("tiny", 16, vocab, seq_len, bos=vocab - 1, dec_layers=2, patch=8)
    m = common.EncoderDecoder(cfg).eval()
    for p in m.parameters():  # larger weights -> peaked, varied distributions (a harder test)
        p.data.mul_(3)
    return m


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_cached_sampling_equals_full_recompute(temperature):
    m, imgs = tiny_model(), torch.randn(3, 3, 16, 16)
    noise = common.example_noise(0, 5, torch.arange(3), 4, 24)
    a = common.sample(m, imgs, 24, k=4, temperature=temperature, noise=noise, use_cache=True)
    b = common.sample(m, imgs, 24, k=4, temperature=temperature, noise=noise, use_cache=False)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=1e-4)  # float32 summation order
    if temperature > 0:  # the samples are not all the same sequence
        assert len({tuple(t) for t in a[0].reshape(12, -1).tolist()}) > 1


def test_sample_logp_equals_teacher_forced_logp():
    """The log-probs REINFORCE differentiates are those of the sampled tokens."""
    m, imgs = tiny_model(), torch.randn(2, 3, 16, 16)
    tok, logp = common.sample(m, imgs, 24, k=3, noise=common.example_noise(1, 0, torch.arange(2), 3, 24))
    tf = common.token_logp(m(imgs, tok.reshape(6, -1)), tok.reshape(6, -1))
    torch.testing.assert_close(logp.reshape(6, -1), tf, atol=1e-4, rtol=1e-4)


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


@pytest.mark.parametrize("kind,grad_on", [("none", "first"), ("independent", "first"), ("loo", "first"),
                                          ("loo", "all"), ("independent", "all")])
def test_reinforce_gradient_is_unbiased(kind, grad_on):
    torch.manual_seed(0)
    theta, R = torch.tensor([0.5, -1.0, 0.0, 1.0, 0.2]), torch.tensor([1.0, 3.0, -2.0, 0.5, 2.0])
    p = theta.softmax(0)
    analytic = p * (R - (p * R).sum())  # d/dtheta E_p[R] for a softmax policy
    B, K = 200_000, 4
    pol = Categorical(theta)
    y = torch.multinomial(p, B * K, replacement=True).view(B, K, 1)
    loss, *_ = common.reinforce_loss(pol, torch.zeros(B), y, R[y[..., 0]], torch.ones(B, K, 1, dtype=torch.bool),
                                     kind, grad_on)
    (-loss).backward()  # loss is minus the objective
    torch.testing.assert_close(pol.theta.grad, analytic, atol=0.02, rtol=0)
    if kind == "loo":  # the same check catches a biased baseline (own reward inside the mean)
        pol.theta.grad = None
        r = R[y[..., 0]]
        adv = (r - r.mean(1, keepdim=True))[:, :1]
        (adv * torch.log_softmax(pol.theta, 0)[y[:, :1, 0]]).mean().backward()
        assert (pol.theta.grad - analytic).abs().max() > 0.05


def test_baselines_exclude_own_reward():
    r = torch.tensor([[1.0, 2.0, 6.0]])
    assert torch.equal(common.baseline(r, "loo"), torch.tensor([[4.0, 3.5, 1.5]]))
    assert torch.equal(common.baseline(r, "independent"), torch.tensor([[2.0, 6.0, 1.0]]))
    assert torch.equal(common.baseline(r, "none"), torch.zeros(1, 3))


def test_until_end_includes_the_end_token():
    t = torch.tensor([[5, 6, 0, 0, 0], [5, 6, 7, 8, 9]])
    assert common.until_end(t, 0).tolist() == [[True, True, True, False, False], [True] * 5]


def test_checkpoint_atomic_and_checked(tmp_path):
    m = tiny_model()
    path = str(tmp_path / "ckpt.pt")
    common.save_ckpt(path, task="detect", model=m.state_dict(), config=m.cfg, step=3)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    ck = common.load_ckpt(path, "detect")
    m2 = common.build_model(ck["config"], "cpu", ck["model"])
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    with pytest.raises(common.UserError, match="task 'detect'"):
        common.load_ckpt(path, "caption")
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
    assert m.encoder.pos.shape == (1, 4, d)  # 4x4 grid resized to our 2x2
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
