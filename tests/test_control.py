"""The shared stage machinery a task script runs on: the fair control (mle_cont at the reward stage's lr, schedule and
steps), eval's refusal of a mismatched pair, --tiny with real data, images opened one way, DDP in every task.
Run: python -m pytest -q tests/test_control.py"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
from test_detect import write_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def detect(*args, ok=True):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "detect.py"), *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert (p.returncode == 0) == ok, p.stderr[-3000:]
    if not ok:  # one line naming the problem, no traceback
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    return p


def lrs(out, stage):
    return {r["step"]: r["lr"] for r in map(json.loads, open(out / "detect" / stage / "log.jsonl")) if "lr" in r}


def test_mle_cont_runs_at_the_reward_stages_lr_and_steps_and_eval_refuses_mismatched_pairs(tmp_path):
    out, tiny = tmp_path / "out", ["--tiny", "--out_dir", tmp_path / "out", "--log_every", "1", "--num_train", "32"]
    detect("--stage", "mle", "--steps", "6", *tiny)
    # --clip and --enc_lr_mult off their defaults: mle_cont, run without them, must still take the reward stage's
    detect("--stage", "reward", "--steps", "4", "--lr", "2e-5", "--warmup", "2", "--clip", "0.5", "--enc_lr_mult",
           "0.5", *tiny)
    detect("--stage", "mle_cont", *tiny)  # no flags: everything from the reward checkpoint
    ck = {s: torch.load(out / "detect" / s / "ckpt.pt", weights_only=True) for s in ["mle", "reward", "mle_cont"]}
    assert ck["mle_cont"]["step"] == ck["reward"]["step"] == 4
    for k in common.CONTROL:
        assert ck["mle_cont"]["args"][k] == ck["reward"]["args"][k], k
    assert ck["mle_cont"]["args"]["clip"] == 0.5 and ck["mle_cont"]["args"]["enc_lr_mult"] == 0.5
    assert ck["mle_cont"]["args"]["schedule"] == "constant" and ck["mle"]["args"]["schedule"] == "cosine"
    # the lr each step ran at: warmup over 2 steps to 2e-5, then constant, in both tunings alike
    assert lrs(out, "mle_cont") == lrs(out, "reward") == pytest.approx({1: 1e-5, 2: 2e-5, 3: 2e-5, 4: 2e-5})
    mle = common.fingerprint(ck["mle"]["model"])
    assert ck["reward"]["meta"]["start"] == ck["mle_cont"]["meta"]["start"] == mle
    assert common.fingerprint(ck["reward"]["model"]) != mle
    # a control of other length or lr is refused, naming the reward stage's values
    p = detect("--stage", "mle_cont", "--steps", "9", "--lr", "1e-4", *tiny, ok=False)
    assert "--steps 4" in p.stderr and f"--lr {2e-5}" in p.stderr
    detect("--stage", "eval", *tiny)
    rows = json.load(open(out / "detect" / "eval" / "metrics.json"))
    assert rows["mle_cont"]["steps"] == rows["reward"]["steps"] == "6+4"
    detect("--stage", "reward", "--steps", "3", "--lr", "2e-5", "--warmup", "2", *tiny)  # mle_cont is now stale
    assert "not the control of reward " in detect("--stage", "eval", *tiny, ok=False).stderr
    detect("--stage", "mle_cont", "--lr", "2e-5", *tiny)  # an explicit flag equal to the reward stage's is fine
    detect("--stage", "eval", *tiny)
    detect("--stage", "reward", "--steps", "3", "--lr", "3e-5", "--warmup", "2", *tiny)  # same steps, other lr
    p = detect("--stage", "eval", *tiny, ok=False)
    assert "not the control of reward " in p.stderr and str(3e-5) in p.stderr
    detect("--stage", "mle", "--steps", "7", *tiny)  # a new mle model: both tunings started from the old one
    assert "did not start from" in detect("--stage", "eval", *tiny, ok=False).stderr


def test_tiny_with_coco_data_builds_the_tiny_model(tmp_path):
    for split in ["train", "val"]:
        write_coco(tmp_path / "coco", split)
    detect("--data", "coco", "--data_dir", tmp_path / "coco", "--train_split", "train", "--val_split", "val",
           "--tiny", "--stage", "mle", "--steps", "2", "--batch_size", "4", "--out_dir", tmp_path / "out")
    cfg = torch.load(tmp_path / "out" / "detect" / "mle" / "ckpt.pt", weights_only=True)["config"]
    assert (cfg["width"], cfg["enc_depth"], cfg["image_size"]) == (*common.SIZES["tiny"][:2], 32)


def test_baseline_none_at_another_temperature_is_refused(tmp_path):
    detect("--stage", "mle", "--steps", "2", "--tiny", "--num_train", "16", "--out_dir", tmp_path)
    p = detect("--stage", "reward", "--baseline", "none", "--temperature", "0.5", "--tiny", "--out_dir", tmp_path,
               ok=False)
    assert "--baseline none with --temperature 0.5" in p.stderr and not (tmp_path / "detect" / "reward").exists()


def test_open_rgb_rescales_16_bit_gray_and_names_a_broken_file(tmp_path):
    ramp = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 16-bit levels 0..255 x 257
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    rgb = np.asarray(common.open_rgb(dict(file=str(tmp_path / "g16.png"))))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 1], np.arange(256).reshape(16, 16))  # not clipped to white
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(tmp_path / "g8.png")  # 8-bit gray: as it is
    assert (np.asarray(common.open_rgb(dict(file=str(tmp_path / "g8.png")))) == 100).all()
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(common.UserError, match="bad.jpg: unreadable image"):
        common.open_rgb(dict(file=str(tmp_path / "bad.jpg")))


@pytest.mark.parametrize("task", ["caption", "colorize", "panoptic"])
def test_two_processes_keep_every_tasks_replicas_in_sync(tmp_path, task):
    """torchrun, 2 CPU processes (gloo), every stage of --tiny (the UViM tasks: their oracle first): each training stage
    ends with both ranks holding identical weights, and eval sees all three. test_detect_cli checks detect the same
    way and against one process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, f"{task}.py"), "--tiny", "--out_dir", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert set(json.load(open(tmp_path / task / "eval" / "metrics.json"))) >= {"mle", "mle_cont", "reward"}
    for stage in ["mle", "reward", "mle_cont"]:
        sums = [r["replica_checksums"] for r in map(json.loads, open(tmp_path / task / stage / "log.jsonl"))
                if "replica_checksums" in r][-1]
        assert len(sums) == 2 and sums[0] == sums[1], stage


def test_two_processes_on_coco_files(tmp_path):
    """The real-data path under torchrun (2 CPU processes): COCO files, the tiny model, every stage. Each rank loads
    and checks the files, rank 0 alone prints (one warning a stage that loads data, not one a rank) and evaluates; the
    replicas stay in sync."""
    for split in ["train", "val"]:
        write_coco(tmp_path / "coco", split)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "detect.py"), "--data", "coco", "--data_dir", str(tmp_path / "coco"), "--train_split",
           "train", "--val_split", "val", "--tiny", "--batch_size", "4", "--out_dir", str(tmp_path / "out")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("warning: val: skipped 1 of 5 images") == 4  # mle, reward, mle_cont, eval
    for stage in ["mle", "reward", "mle_cont"]:
        sums = [r["replica_checksums"] for r in map(json.loads, open(tmp_path / "out" / "detect" / stage / "log.jsonl"))
                if "replica_checksums" in r][-1]
        assert len(sums) == 2 and sums[0] == sums[1], stage
    assert set(json.load(open(tmp_path / "out" / "detect" / "eval" / "metrics.json"))) == {"mle", "reward", "mle_cont"}
