"""Bad flags and bad input end in one line naming the problem (common.UserError, or argparse's), before any training.
Run: python -m pytest -q tests/test_cli_errors.py"""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import caption
import colorize
import common
import detect
import panoptic
import vqvae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refused(monkeypatch, mod, argv, match):
    """mod.main() on argv stops with a UserError matching `match` (what common.run prints as one line)."""
    monkeypatch.setattr(sys, "argv", [f"{mod.__name__}.py", *argv])
    with pytest.raises(common.UserError, match=match):
        mod.main()


@pytest.mark.parametrize("mod,argv,match", [
    # counts and intervals of 0 divided by zero or trained nothing (then the next stage failed far away)
    (detect, ["--stage", "mle", "--ckpt_every", "0"], r"--ckpt_every 0: must be > 0"),
    (detect, ["--stage", "mle", "--log_every", "0"], r"--log_every 0: must be > 0"),
    (detect, ["--stage", "mle", "--steps", "-5"], r"--steps -5: must be > 0"),
    (caption, ["--stage", "mle", "--batch_size", "0"], r"--batch_size 0: must be > 0"),
    (colorize, ["--stage", "eval", "--eval_images", "0"], r"--eval_images 0: must be > 0"),
    # T = 0 in the reward stage: K identical greedy samples, every advantage 0, nothing learnt
    (detect, ["--stage", "reward", "--temperature", "0"], r"--temperature 0.0: must be > 0"),
    # flags of real data without --data: the synthetic world trained silently
    (detect, ["--stage", "mle", "--data_dir", "/nonexistent"], r"--data_dir needs --data coco"),
    (caption, ["--stage", "mle", "--karpathy", "/nonexistent.json"], r"--karpathy need --data coco"),
    (colorize, ["--stage", "mle", "--data_dir", "/nonexistent"], r"--data_dir needs --data folder"),
    # samplers that would silently emit garbage (top_p 0: the last code every time) or a sharpened nothing
    (colorize, ["--stage", "eval", "--top_p", "0"], r"--top_p 0.0.*0 < p <= 1"),
    (colorize, ["--stage", "eval", "--top_p", "1.5"], r"--top_p 1.5.*0 < p <= 1"),
    (colorize, ["--stage", "eval", "--eval_temperature", "-1"], r"--eval_temperature -1.0"),
    # every object missed: no box to learn, NaN class weights
    (detect, ["--stage", "mle", "--missed", "1"], r"--missed 1.0"),
    # before stage I trains (the oracle stage comes before the others' flags are read), the control, the oracle's own
    (colorize, ["--stage", "all", "--samples", "0"], r"--samples 0: must be > 0"),
    (detect, ["--stage", "mle_cont", "--ckpt_every", "0"], r"--ckpt_every 0: must be > 0"),
    (colorize, ["--stage", "oracle", "--oracle_flags", "--log_every 0"], r"--log_every 0: must be > 0"),
    # flags that trained nothing (lr 0, no micro-batch), an LM blind to the image, or crashed deep in numpy / torch
    (panoptic, ["--stage", "mle", "--lr", "0"], r"--lr 0.0: must be > 0"),
    (detect, ["--stage", "mle", "--micro_batch", "-1"], r"--micro_batch -1: must be >= 0"),
    (detect, ["--stage", "mle", "--micro_batch", "3"], r"--micro_batch 3: must be 0 \(whole\) or divide"),
    (caption, ["--stage", "eval", "--micro_batch", "-1"], r"--micro_batch -1: must be >= 0"),  # also eval's batch
    (panoptic, ["--stage", "oracle", "--oracle_flags", "--micro_batch -2"], r"--micro_batch -2: must be >= 0"),
    # negative where 0 means none / off: numpy's or the DataLoader's traceback (seed, workers), a stage that stopped
    # after step 1 with exit 0 (stop_at), an eval every step (eval_every), an encoder trained by gradient ascent
    (detect, ["--stage", "mle", "--seed", "-1"], r"--seed -1: must be >= 0"),
    (caption, ["--stage", "mle", "--workers", "-1"], r"--workers -1: must be >= 0"),
    (colorize, ["--stage", "mle", "--stop_at", "-1"], r"--stop_at -1: must be >= 0"),
    (panoptic, ["--stage", "reward", "--eval_every", "-1", "--enc_lr_mult", "-1"],
     r"--enc_lr_mult -1.0: must be >= 0, --eval_every -1: must be >= 0"),
    (caption, ["--stage", "mle", "--dec_layers", "0"], r"--dec_layers 0: must be > 0"),
    (detect, ["--stage", "mle", "--patch", "0"], r"--patch 0: must be > 0"),
    (caption, ["--stage", "mle", "--image_size", "-32"], r"--image_size -32: must be > 0"),  # was: numpy's traceback
    (panoptic, ["--stage", "all", "--patch", "0"], r"--patch 0: must be > 0"),  # was: only after stage I trained
    (detect, ["--stage", "all", "--max_things", "0"], r"--max_things 0: must be > 0"),
    # no synthetic scenes: numpy's traceback (detect) or a NaN CIDEr-D with exit 0 (caption)
    (detect, ["--stage", "mle", "--num_train", "0"], r"--num_train 0: must be > 0"),
    (caption, ["--stage", "mle", "--num_val", "0"], r"--num_val 0: must be > 0"),
    # the oracle's sizes (tracebacks deep in torch, or an oracle of depth 0 that trained and reported nothing)
    (panoptic, ["--stage", "oracle", "--oracle_flags", "--codebook 0"], r"--codebook 0: must be > 0"),
    (panoptic, ["--stage", "oracle", "--oracle_flags", "--instances 0"], r"--instances 0: must be > 0"),
    (colorize, ["--stage", "oracle", "--oracle_flags", "--depth 0"], r"--depth 0: must be > 0"),
    (colorize, ["--stage", "oracle", "--oracle_flags", "--heads 3"], r"--heads dividing --width \(got 3, 64\)"),
    (panoptic, ["--stage", "oracle", "--oracle_flags", "--pixel -1"], r"--pixel >= 0 \(got -1\)"),
    # --init with eval: eval compares the checkpoints under --out_dir, and ignored --init without a word
    (caption, ["--stage", "eval", "--init", "/some/ckpt.pt"], r"--init /some/ckpt.pt: --stage eval compares"),
    # stage II's ViT patch must divide the oracle's images: it was refused only after stage I had trained
    (panoptic, ["--stage", "all", "--patch", "5"], r"stage II's ViT patch 5 .* image size 32"),
    (colorize, ["--stage", "all", "--model", "S/5"], r"stage II's ViT patch 5 .* image size 32"),
    # a reward name not in REWARDS (no argparse choices: a reward added to REWARDS needs no second edit), before stage I
    (detect, ["--stage", "all", "--reward", "nope"], r"--reward nope: not in REWARDS \(map, recall\)$"),
    (panoptic, ["--stage", "all", "--reward", "map"], r"--reward map: not in REWARDS \(pq\)$"),
])
def test_bad_flags_are_refused_before_any_work(monkeypatch, tmp_path, mod, argv, match):
    refused(monkeypatch, mod, ["--tiny", "--out_dir", str(tmp_path), *argv], match)
    assert not any(f.endswith(".pt") for _, _, fs in os.walk(tmp_path) for f in fs)  # nothing was trained


def write_instances(root, annotations, split="train2017"):
    os.makedirs(root / "annotations", exist_ok=True)
    gt = dict(images=[dict(id=1, file_name="a.png", width=20, height=10)],
              categories=[dict(id=3, name="square"), dict(id=7, name="circle")], annotations=annotations)
    with open(root / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(gt, f)


@pytest.mark.parametrize("ann,match", [
    (dict(image_id=9, category_id=3, bbox=[0, 0, 4, 4]), r"annotation 1: image_id 9"),
    (dict(image_id=1, category_id=5, bbox=[0, 0, 4, 4]), r"annotation 1: category_id 5"),
    (dict(image_id=1, category_id=3, bbox=[0, 0, 4]), r"annotation 1: bbox \[0, 0, 4\]"),
    (dict(image_id=1, category_id=3, bbox=[0, 0, -4, 4]), r"annotation 1: bbox \[0, 0, -4, 4\]"),
    (dict(image_id=1, category_id=3, bbox=[float("nan"), 0, 4, 4]), r"annotation 1: bbox \[nan, 0, 4, 4\]"),  # trained
    (dict(image_id="1", category_id=3, bbox=[0, 0, 4, 4]), r"annotation 1: image_id '1'"),  # not "image_id 1"
    (dict(image_id=1, category_id=3, bbox=[0, 0, 4, 4], iscrowd="no"), r"annotation 1: iscrowd 'no'"),  # crowd?
])
def test_coco_instances_errors_name_the_annotation_and_field(tmp_path, ann, match):
    write_instances(tmp_path, [dict(image_id=1, category_id=7, bbox=[1, 1, 5, 5]), ann])  # annotation 0 is fine
    with pytest.raises(common.UserError, match="instances_train2017.json: " + match):
        detect.load_coco(str(tmp_path), "train2017")
    write_instances(tmp_path, [dict(image_id=1, category_id=7, bbox=[1, 1, 5, 5]),  # and the good annotation loads,
                               dict(image_id=1, category_id=3, bbox=[30, 2, 4, 4]),  # one outside the 20 x 10 image
                               dict(image_id=1, category_id=3, bbox=[18, 8, 0, 0])])  # and one of no size: no targets
    items, *_ = detect.load_coco(str(tmp_path), "train2017")
    assert items[0]["labels"] == [1] and items[0]["boxes"].tolist() == [pytest.approx([0.1, 0.05, 0.6, 0.3])]  # yxyx


def test_a_training_split_without_boxes_is_refused():
    with pytest.raises(common.UserError, match="no \\(non-crowd\\) boxes"):
        detect.class_weights([dict(labels=[]), dict(labels=[])], 5)
    assert detect.class_weights([dict(labels=[0]), dict(labels=[1, 1])], 2)[0] > 1  # the rarer class weighs more


class BadImages(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise common.UserError(f"/data/{i}.png: unreadable image (OSError: broken data stream)")


def main_with_a_worker():  # the training loaders with --workers 1: the error is raised in another process
    for _ in torch.utils.data.DataLoader(BadImages(), num_workers=1):
        pass


def main_with_a_file_for_a_folder(path):
    common.Logger(os.path.join(path, "detect"), True)  # --out_dir names a file: os.makedirs fails


def main_with_a_bare_os_error():
    raise TimeoutError()  # no message at all


@pytest.mark.parametrize("which", ["worker", "oserror", "bare"])
def test_errors_in_workers_and_of_the_os_are_one_line(tmp_path, capsys, which):
    (tmp_path / "afile").write_text("")
    main = {"worker": main_with_a_worker, "bare": main_with_a_bare_os_error,
            "oserror": lambda: main_with_a_file_for_a_folder(str(tmp_path / "afile"))}[which]
    with pytest.raises(SystemExit) as e:
        common.run(main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err  # one line, not the worker's traceback
    assert err == {"worker": "error: /data/0.png: unreadable image (OSError: broken data stream)\n",
                   "oserror": f"error: [Errno 20] Not a directory: '{tmp_path / 'afile' / 'detect'}'\n",
                   "bare": "error: TimeoutError\n"}[which]


def test_an_unclosed_quote_in_oracle_flags_is_one_line():
    with pytest.raises(common.UserError, match="--oracle_flags \"--steps 'x\": No closing quotation"):
        vqvae.oracle_args(argparse.Namespace(oracle_flags="--steps 'x"), "colorize")
    r = subprocess.run([sys.executable, "colorize.py", "--stage", "oracle", "--oracle_flags", "--steps abc"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "usage: vqvae.py" in r.stderr and "invalid int value: 'abc'" in r.stderr


@pytest.mark.parametrize("ck_tiny,run_tiny", [(True, False), (False, True)])
def test_a_tiny_runs_oracle_is_not_a_full_runs(tmp_path, ck_tiny, run_tiny):
    """Single stages load out_dir/vqvae_<task>/ckpt.pt: a --tiny run's (32 px) used to become a preset run's."""
    path = str(tmp_path / "ckpt.pt")
    common.save_ckpt(path, task="vqvae_colorize", model={}, config={}, step=1, args=dict(tiny=ck_tiny))
    with pytest.raises(common.UserError, match=f"ckpt.pt: the oracle of a {'--tiny' if ck_tiny else 'full-size'}"):
        vqvae.load(path, "colorize", "cpu", argparse.Namespace(tiny=run_tiny))
    with pytest.raises(KeyError):  # --oracle given (no run flags to match): past the check, to the empty config
        vqvae.load(path, "colorize", "cpu", None)


def test_resume_with_another_vocabulary_is_refused(tmp_path):
    """caption's --min_count / --max_len shape the vocabulary and sequence: resuming with others crashed in the LM."""
    args = argparse.Namespace(out_dir=str(tmp_path), resume=True, batch_size=4, micro_batch=0, optimizer="adamw",
                              wd=0.0, enc_lr_mult=0.1, seed=0, min_count=2, max_len=20)
    path = tmp_path / "caption" / "mle" / "ckpt.pt"
    common.save_ckpt(str(path), task="caption", model={}, config={}, meta={}, step=5, optimizer={},
                     args=dict(vars(args), min_count=3))
    with pytest.raises(common.UserError, match=r"made with \{'min_count': 3\}; resume with the same flags"):
        common.stage_setup("caption", "mle", args, {}, {}, "cpu", 1)


def test_resume_with_another_lr_is_refused(tmp_path):
    """--resume --lr X kept the stage's steps at the old lr and wrote X into the checkpoint: its control (mle_cont
    copies the reward stage's args) then trained at an lr the reward stage never had."""
    args = argparse.Namespace(out_dir=str(tmp_path), resume=True, batch_size=4, micro_batch=0, optimizer="adamw",
                              lr=1e-3, warmup=0, schedule="constant", wd=0.0, enc_lr_mult=1.0, clip=1.0, seed=0)
    path = tmp_path / "detect" / "mle" / "ckpt.pt"
    common.save_ckpt(str(path), task="detect", model={}, config={}, meta={}, step=5, optimizer={},
                     args=dict(vars(args), lr=1e-5))
    with pytest.raises(common.UserError, match=r"made with \{'lr': 1e-05\}; resume with the same flags"):
        common.stage_setup("detect", "mle", args, {}, {}, "cpu", 1)


def help_of(parser, flag):  # the --help text of one flag, whitespace folded (argparse wraps it)
    text = parser.format_help().split(f"\n  {flag} ", 1)[1]
    return " ".join(text.split("\n  -", 1)[0].split())


@pytest.mark.parametrize("mod", [detect, caption, colorize, panoptic, vqvae])
def test_help_shows_fixed_defaults_and_not_the_presets_none(mod):
    fixed = {a.dest: a.default for a in mod.p._actions if a.nargs != 0 and a.default not in (None, "")}
    assert len(fixed) >= 10  # seed, log_every, ckpt_every, out_dir, ...
    for dest, default in fixed.items():
        assert help_of(mod.p, f"--{dest}").endswith(f"(default: {default})"), dest
    for flag in ["--lr", "--resume", "--data_dir"]:  # the preset's (None), a switch, "" (nothing given)
        assert "(default:" not in help_of(mod.p, flag), flag
    from_preset = [a.dest for a in mod.p._actions if a.default is None and a.nargs != 0]  # no default shown:
    assert len(from_preset) >= 5 and all("preset" in help_of(mod.p, f"--{d}") for d in from_preset)  # says whose


@pytest.mark.parametrize("mod", [detect, caption, colorize, panoptic])
def test_a_reward_stage_before_mle_says_which_stage_writes_its_start(monkeypatch, tmp_path, mod):
    path = os.path.join(str(tmp_path), mod.__name__, "mle", "ckpt.pt")
    refused(monkeypatch, mod, ["--tiny", "--out_dir", str(tmp_path), "--stage", "reward"],
            f"^{re.escape(path)}: no such file \\(run --stage mle\\)$")
    for other in ["x.pt", "foo_mle/ckpt.pt"]:  # any other file: no hint
        with pytest.raises(common.UserError, match=r"\.pt: no such file$"):
            common.torch_load(str(tmp_path / other))


def test_a_start_of_another_image_size_names_its_checkpoint(tmp_path):
    args = argparse.Namespace(out_dir=str(tmp_path), resume=False, batch_size=4, micro_batch=0, init="", image_size=64,
                              reward_dir="reward")
    cfg = common.model_config("tiny", 32, 10, 4, 0, 1, 8)
    start = re.escape(str(tmp_path / "caption" / "mle" / "ckpt.pt"))
    with pytest.raises(common.UserError, match=f"^{start}: a model of 32 px images"):
        common.stage_setup("caption", "reward", args, cfg, {}, "cpu", 1, init_state={})
