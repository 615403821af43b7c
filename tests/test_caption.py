"""caption.py: CIDEr-D against pycocoevalcap (the oracle), the cached reward, EOS, tokens, loaders, the CLI.
Run: python -m pytest -q tests/test_caption.py"""
import json
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from pycocoevalcap.cider.cider import Cider

import caption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "a an the red blue green square circle ring on of and with two three sky grass is there UNK".split()


def corpus(seed, n_images, max_words=25):
    rng = random.Random(seed)
    sent = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    gts = {i: [sent(rng.randint(0, max_words)) for _ in range(rng.randint(1, 6))] for i in range(n_images)}
    return gts, {i: [sent(rng.randint(0, max_words + 5))] for i in range(n_images)}


@pytest.mark.parametrize("seed,n", [(0, 1), (1, 3), (2, 40), (3, 300)])
def test_cider_d_equals_pycocoevalcap_random(seed, n):
    gts, res = corpus(seed, n)
    ref, ref_scores = Cider().compute_score(gts, res)
    ours, scores = caption.cider_d(gts, res)
    assert abs(ours - ref) < 1e-9 and np.abs(np.asarray(ref_scores) - scores).max() < 1e-9
    if n == 1:
        assert ours == 0  # one image: log N = 0, every weight is 0 (pycocoevalcap's known behaviour)


def test_cider_d_equals_pycocoevalcap_edge_cases():
    long = " ".join(["the red square on the grass"] * 12)
    gts = {"a": ["a red square on the grass", "the the the the", "a red square"],
           "b": ["two blue circles and a ring", "UNK UNK ring"],
           "c": [long, "a long caption", ""],
           7: ["there is a green ring", "a green ring on the sky", "green green green ring"]}
    res = {"a": ["a red square on the grass"],  # a perfect copy of one reference
           "b": [""],  # an empty caption
           "c": [long + " with a star"],  # longer than any reference length the reward sees
           7: ["ring ring ring ring ring UNK"]}  # repeated words, UNK
    ref, ref_scores = Cider().compute_score(gts, res)
    ours, scores = caption.cider_d(gts, res)
    assert abs(ours - ref) < 1e-9 and np.abs(np.asarray(ref_scores) - scores).max() < 1e-9
    assert scores[1] == 0 and scores[0] > scores[3] > 0


def test_cider_d_rejects_mismatched_keys():
    with pytest.raises(ValueError):
        caption.cider_d({1: ["a b"]}, {2: ["a b"]})


def tokens(vocab, s, L=12):
    return caption.encode(caption.tokenize(s), {w: i for i, w in enumerate(vocab)}, L - 1)


def test_cached_reward_equals_cider_d_per_image():
    """The reward (token ids, EOS as a word, references computed once per image for its K samples) gives
    cider_d's per-image numbers when both see the same references and the same document frequencies."""
    gts, res = corpus(4, 12, max_words=10)
    vocab = caption.SPECIALS + sorted({w.lower() for v in gts.values() for s in v for w in s.split()} | set(WORDS))
    L = 16
    enc = lambda s: tokens(vocab, s, L)  # noqa: E731
    refs = [[enc(r).tolist() for r in gts[i]] for i in gts]
    scorer = caption.CiderD([[t[:t.index(caption.EOS) + 1] for t in r] for r in refs], len(vocab))
    K = 3
    hyps = {(i, k): corpus(100 + 10 * i + k, 1, 10)[1][0][0] for i in gts for k in range(K)}
    pred = torch.stack([torch.stack([enc(hyps[i, k]) for k in range(K)]) for i in gts])  # (B, K, L)
    rt = torch.full((len(gts), 6, L), -1)
    for b, i in enumerate(gts):
        for j, r in enumerate(refs[b]):
            rt[b, j] = torch.where(caption.common.until_end(torch.tensor(r), caption.EOS), torch.tensor(r), -1)
    r, aux = caption.reward_cider(pred, dict(cider=scorer, refs=rt, nref=torch.tensor([len(v) for v in gts.values()])))
    # the same thing as strings, "<eos>" a word of every sentence; df from the 12 images, not the 36 keys
    eos = lambda s: " ".join(caption.tokenize(s)[:L - 1] + ["<eos>"])  # noqa: E731
    for k in range(K):
        _, s = caption.cider_d({i: [eos(x) for x in gts[i]] for i in gts}, {i: [eos(hyps[i, k])] for i in gts})
        np.testing.assert_allclose(r[:, k].double().numpy(), s, rtol=1e-6, atol=1e-6)
    assert r.shape == (12, K) and r.max() > 0


def test_unfinished_caption_scores_below_finished():
    vocab = caption.SPECIALS + "a red square on the grass sky".split()
    refs = [[tokens(vocab, s).tolist() for s in ["a red square on the grass", "a red square"]],
            [tokens(vocab, "the sky").tolist()]]
    scorer = caption.CiderD([[t[:t.index(caption.EOS) + 1] for t in r] for r in refs], len(vocab))
    done = tokens(vocab, "a red square on the grass")
    unfinished = done.clone()
    unfinished[unfinished == caption.EOS] = vocab.index("grass")  # same words, then no end within the length
    unfinished[unfinished == caption.PAD] = vocab.index("grass")
    rt = torch.full((1, 2, 12), -1)
    for j, t in enumerate(refs[0]):
        rt[0, j, :len(t[:t.index(caption.EOS) + 1])] = torch.tensor(t[:t.index(caption.EOS) + 1])
    batch = dict(cider=scorer, refs=rt, nref=torch.tensor([2]))
    r, _ = caption.reward_cider(torch.stack([done, unfinished])[None], batch)
    assert r[0, 0] > r[0, 1] > 0


# pycocoevalcap 1.2's PTBTokenizer (java, stanford-corenlp 3.4.1) on these captions, then its punctuation
# filter: its outputs, recorded from a run here (it needs java, which a test machine need not have)
PTB = {
    "A man's T-shirt, (red).": "a man 's t-shirt -lrb- red -rrb-",
    "Two dogs can't play; they won't.": "two dogs ca n't play they wo n't",
    "I'm sure they're here, we've been, you'll see, he'd go":
        "i 'm sure they 're here we 've been you 'll see he 'd go",
    'A "large" pizza & beer': 'a large pizza & beer',
    "the kids' toys": 'the kids toys',
    'a 2-year-old child': 'a 2-year-old child',
    'a 1/2 eaten pizza': 'a 1/2 eaten pizza',
    'a plate w/ food': 'a plate w / food',
    'a room w/o windows': 'a room w/o windows',
    'A st. bernard dog': 'a st. bernard dog',
    'a dog. a cat': 'a dog a cat',
    'U.S. flag at 5:30 p.m.': 'u.s. flag at 5:30 p.m.',
    'a clock reading 12:45.': 'a clock reading 12:45',
    'A 3.5 inch screen, and/or a phone!': 'a 3.5 inch screen and/or a phone',
    'a #1 sign costs $5 or 50%': 'a # 1 sign costs $ 5 or 50 %',
    '#hashtag': '#hashtag',
    'a [blue] car': 'a -lsb- blue -rsb- car',
    'a {red} car': 'a -lcb- red -rcb- car',
    'Two people--a man and woman--walking': 'two people a man and woman walking',
    "it's 10 o'clock": "it 's 10 o'clock",
    'cannot': 'can not',
    'a b&w photo': 'a b & w photo',
    'e-mail me @home': 'e-mail me @home',
    'A dog on a couch;a cat on a chair': 'a dog on a couch a cat on a chair',
    "Someone's breakfast: eggs, toast, and coffee.": "someone 's breakfast eggs toast and coffee",
    "Man in a 1950's car.": "man in a 1950 's car",
    'café au lait': 'café au lait',
}


def test_tokenizer_equals_the_coco_evaluations_ptb_tokenizer():
    for caption_text, words in PTB.items():
        assert caption.tokenize(caption_text) == words.split(), caption_text
        assert caption.tokenize(words) == words.split()  # stable: the eval re-reads predicted words


def test_tokenizer_vocab_and_round_trip():
    assert caption.tokenize("Two RED squares, a ring.") == ["two", "red", "squares", "a", "ring"]
    items = [dict(refs=["a red square", "a red ring"]), dict(refs=["a blue star"])]
    vocab = caption.build_vocab(items, min_count=2)
    assert vocab[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and vocab[4:] == ["a", "red"]  # by frequency
    stoi = {w: i for i, w in enumerate(vocab)}
    t = caption.encode(caption.tokenize("A red star"), stoi, 5)
    assert t.tolist() == [4, 5, caption.UNK, caption.EOS, caption.PAD, caption.PAD]
    assert caption.decode(t, vocab) == "a red <unk>"
    assert caption.encode(["a"] * 9, stoi, 5).tolist() == [4] * 5 + [caption.EOS]  # cut to max_len words
    g = caption.grammar(len(vocab), 5)
    assert not g[:, caption.PAD].any() and not g[:, caption.BOS].any() and g[5].tolist() == [0, 0, 1, 0, 0, 0]


def test_synthetic_references_are_five_annotators_naming_the_scene():
    """Every reference names at least one (colour, shape) of its scene, none that is not there, the right number
    where it gives one; within the caption length; five different wordings; a function of the seed."""
    items = caption.load_synthetic("val", 300, 64, 0)
    for it in items:
        assert len(it["refs"]) == 5 and len(set(it["refs"])) == 5
        truth = Counter(it["objects"])
        for r in it["refs"]:
            said, words = caption.named(r), caption.tokenize(r)
            assert said and set(said) <= set(truth), (r, it["objects"])  # no content-free kind, nothing made up
            assert all(n is None or n == truth[g] for g, n in said.items()), (r, it["objects"])
            assert len(words) <= 20 and words[-1] not in caption.BAD_ENDINGS
    groups = [len(set(it["objects"])) for it in items]
    recall = [len(set(caption.named(r))) / g for it, g in zip(items, groups) for r in it["refs"]]
    assert np.mean(recall) > 0.95  # the salient objects, all of them when the length allows
    text = " ".join(r for it in items for r in it["refs"])
    for w in ["box", "disc", "ball", "donut", "two", "three", "next to", "left of", "above", "there is", "there are",
              "a picture of", "grass", "sky", "wall"]:  # synonyms, counts, relations, frames, the ground and sky
        assert f" {w} " in f" {text} ", w
    starts = Counter(" ".join(caption.tokenize(r)[:2]) for it in items for r in it["refs"])
    assert starts.most_common(1)[0][1] < 0.3 * 5 * len(items)  # no one frame most references share
    assert [it["refs"] for it in caption.load_synthetic("val", 300, 64, 0)] == [it["refs"] for it in items]  # seed
    other = caption.load_synthetic("val", 300, 64, 1)
    assert sum(a["refs"] != b["refs"] for a, b in zip(other, items)) > 250
    short = caption.load_synthetic("val", 300, 64, 0, max_len=8)
    assert all(len(caption.tokenize(r)) <= 8 and caption.named(r) for it in short for r in it["refs"])


def test_content_metric_on_hand_made_captions():
    scene = [("red", "square"), ("red", "square"), ("blue", "ring"), ("green", "star")]  # 3 groups
    assert caption.named("Two red boxes, and a Blue Donut.") == {("red", "square"): 2, ("blue", "ring"): 1}
    assert caption.named("red discs near a teal ball on green grass under a blue sky") == {
        ("red", "circle"): None, ("teal", "circle"): 1}  # plural without a number: no count; "blue sky": no shape
    caps = ["two red boxes and a blue donut",  # P 1, R 2/3, F1 0.8; counts 2 of 2 right
            "three red squares and a purple star",  # P 1/2, R 1/3, F1 0.4; counts 0 of 2 (purple star: 0 there)
            "there are four shapes on the grass",  # names nothing: 0, 0, 0; no count
            "a red square next to a green star"]  # P 1, R 2/3, F1 0.8; counts 1 of 2 (two red squares there)
    m = caption.content_metrics(caps, [scene] * 4)
    assert m["content_precision"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert m["content_recall"] == pytest.approx((2 / 3 + 1 / 3 + 0 + 2 / 3) / 4)
    assert m["content_F1"] == pytest.approx((0.8 + 0.4 + 0 + 0.8) / 4)
    assert m["count_accuracy"] == pytest.approx(3 / 6)
    assert caption.content_metrics(["a red circle"], [[("red", "ring")]])["content_F1"] == 0  # the shape matters
    assert caption.content_metrics(["shapes"], [scene])["count_accuracy"] is None


def test_human_row_is_one_reference_against_the_others():
    items = caption.load_synthetic("val", 40, 64, 0)
    h = caption.human_metrics(items)
    held = {it["id"]: [" ".join(caption.tokenize(it["refs"][0]))] for it in items}
    cider, _ = caption.cider_d({it["id"]: [" ".join(caption.tokenize(r)) for r in it["refs"][1:]] for it in items},
                               held)
    assert h["CIDEr"] == pytest.approx(100 * cider) and h["content_F1"] == 1.0  # annotators name what is there
    with_itself = caption.caption_metrics([dict(image_id=i, caption=c[0]) for i, c in held.items()], items)
    # scored against itself too it would look better: the copy is the best reference there can be (sim_n = 1 for
    # each n-gram order, the Cauchy-Schwarz maximum, length penalty exp(0) = 1), so with the document frequencies
    # unchanged an image's score would be (10 + 4 x its human score) / 5 (a caption of 4+ words), above the human
    # score whenever that is below the maximum 10 (CIDEr 1000); the copy also raises the df of its own n-grams,
    # which moves the score a little (CIDEr 506 here, 200 + 0.8 x 369 = 496 with the df unchanged)
    assert h["CIDEr"] < 1000 and with_itself["CIDEr"] > h["CIDEr"]
    coco = [dict(id=it["id"], refs=it["refs"]) for it in items]  # no objects: no content metric
    assert "content_F1" not in caption.human_metrics(coco) and h["length"] == pytest.approx(
        np.mean([len(c[0].split()) for c in held.values()]))


def test_grid_wraps_words_within_the_column():
    from PIL import ImageFont
    font = ImageFont.load_default(size=15)
    text = "a picture of two red boxes next to a yellow donut, a teal disc and a purple star on the grass under the sky"
    lines = caption.wrap(text, font, 216)
    assert " ".join(lines) == text and len(lines) > 2 and all(font.getlength(x) <= 216 for x in lines)
    assert font.getlength("a b") > font.getlength("ab") + 2  # a visible space between words


# ----------------------------------------------------------------------------- the CLI


def run(*args, ok=True):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "caption.py"), *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def write_coco(root, split, karpathy=None):
    """A tiny COCO captions layout: odd sizes, grayscale, RGBA, a corrupt file, an image without captions."""
    os.makedirs(root / split, exist_ok=True)
    os.makedirs(root / "annotations", exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for k, (w, h, mode) in enumerate([(48, 64, "RGB"), (33, 47, "L"), (40, 40, "RGBA"), (50, 30, "RGB"),
                                      (20, 20, "RGB"), (32, 32, "RGB")]):
        name = f"{split}_{k}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, len(mode)) if mode != "L" else (h, w), dtype=np.uint8).squeeze(),
                        mode).save(root / split / name)
        images.append(dict(id=100 + k, file_name=name, width=w, height=h))
        if k < 5:
            caps = ["A red square on the grass.", "Two blue circles, and a ring!", "a picture of a star"]
            anns += [dict(id=len(anns) + 1, image_id=100 + k, caption=c) for c in caps[: 1 + k % 3]]
    (root / split / f"{split}_3.png").write_bytes(b"not a png")  # unreadable: skipped with a count
    with open(root / "annotations" / f"captions_{split}.json", "w") as f:
        json.dump(dict(images=images, annotations=anns), f)


def test_tiny_runs_every_stage(tmp_path):
    p = run("--tiny", "--out_dir", tmp_path)
    out = tmp_path / "caption" / "eval"
    m = json.load(open(out / "metrics.json"))
    # no range on the length (<= --max_len 20 cannot fail), and no "reward rises": at --tiny scale (10 steps) the
    # mean sampled reward of steps 1-5 vs 6-10 fell for seeds 0 and 1 and rose for seed 2 (issue 20)
    log = {s: [json.loads(x) for x in open(tmp_path / "caption" / s / "log.jsonl")] for s in ["mle", "reward",
                                                                                             "mle_cont"]}
    for stage, lines in log.items():  # each stage ends with a greedy eval of the weights it saves; the eval stage
        val = [r["val_CIDEr"] for r in lines if "val_CIDEr" in r]  # reloads them: the same CIDEr (log: 5 decimals)
        assert val and abs(val[-1] - m[stage]["CIDEr"]) < 1e-5, stage
    adv = [r["adv_std"] for r in log["reward"] if "adv_std" in r]
    assert adv and min(adv) > 0  # K = 4 captions sampled at temperature 0.7 differ, so do their rewards
    # the mle row recomputed from the files: its captions against the references of the first 16 held-out scenes
    # as caption.py draws them (caption.TINY: 32 px, 16 images; seed 0, --max_len 20), CIDEr-D x 100
    items = caption.load_synthetic("val", caption.TINY["eval_images"], caption.TINY["image_size"], 0)
    refs = {it["id"]: [" ".join(caption.tokenize(r)) for r in it["refs"]] for it in items}
    res = {r["image_id"]: [r["caption"]] for r in json.load(open(out / "captions_mle.json"))}
    assert 100 * caption.cider_d(refs, res)[0] == pytest.approx(m["mle"]["CIDEr"], rel=1e-9, abs=1e-9)
    assert m["human"]["CIDEr"] == pytest.approx(caption.human_metrics(items)["CIDEr"], rel=1e-9)  # all have 5 refs
    assert m["human"]["content_F1"] == 1.0
    assert "encoder: " + str(tmp_path / "caption/encoder/encoder.pt") in p.stdout  # the mle stage started from it
    assert m["mle"]["steps"] == "30" and m["reward"]["steps"] == m["mle_cont"]["steps"] == "30+10"  # fair control
    res = json.load(open(out / "captions_reward.json"))
    assert len(res) == 16 and all(set(r) == {"image_id", "caption"} for r in res)
    # the grid: 8 images, each in a row of equal square panels: the image, a reference, mle, mle_cont, reward
    w, h = Image.open(out / "grid.png").size
    assert "| reward |" in p.stdout and w % 5 == 0 and 8 * (w // 5) <= h < 9 * (w // 5)
    run("--tiny", "--stage", "eval", "--eval_images", 3, "--out_dir", tmp_path)  # fewer images than the grid's 8 rows
    w, h = Image.open(out / "grid.png").size  # (it crashed: the grid asked for 8 captions of each model)
    assert 3 * (w // 5) <= h < 4 * (w // 5) and len(json.load(open(out / "captions_mle.json"))) == 3


def test_coco_fixture_loads_trains_and_evaluates(tmp_path):
    for split in ["train", "val"]:
        write_coco(tmp_path / "coco", split)
    p = run("--data", "coco", "--data_dir", tmp_path / "coco", "--train_split", "train", "--val_split", "val",
            "--tiny", "--model", "tiny", "--patch", "8", "--batch_size", "4", "--out_dir", tmp_path / "out")
    assert "skipped 1 of 5 images" in p.stdout
    assert "| human |" in p.stdout and "content F1" not in p.stdout  # no truth of a photo: no content columns
    res = json.load(open(tmp_path / "out/caption/eval/captions_mle.json"))
    assert {r["image_id"] for r in res} == {100, 101, 102, 104}  # no captions: 105 out; corrupt: 103 out


def test_karpathy_split_loads(tmp_path):
    write_coco(tmp_path, "val2014")
    kp = dict(images=[dict(filepath="val2014", filename=f"val2014_{k}.png", cocoid=100 + k, split=s,
                           sentences=[dict(raw=f"a red square number {k}")]) for k, s in
                      enumerate(["train", "restval", "test", "val", "test"])])
    with open(tmp_path / "dataset_coco.json", "w") as f:
        json.dump(kp, f)
    args = caption.p.parse_args(["--data", "coco", "--data_dir", str(tmp_path), "--karpathy",
                                 str(tmp_path / "dataset_coco.json")])
    assert [it["id"] for it in caption.load_coco(args, "train")] == [100, 101]
    test = caption.load_coco(args, "test")
    assert [it["id"] for it in test] == [102, 104] and test[0]["file"].endswith("val2014/val2014_2.png")
    kp["images"][2]["sentences"] += [dict(raw=""), dict(raw=" ... ")]  # no words: was a reference of EOS alone
    kp["images"][4]["sentences"] = [dict(raw="!")]  # its only caption has no word: the image has none
    with open(tmp_path / "dataset_coco.json", "w") as f:
        json.dump(kp, f)
    test = caption.load_coco(args, "test")
    assert [it["id"] for it in test] == [102] and test[0]["refs"] == ["a red square number 2"]
    kp["images"][2]["sentences"][0]["raw"] = None  # a caption that is not a string: one line, not a crash later
    with open(tmp_path / "dataset_coco.json", "w") as f:
        json.dump(kp, f)
    with pytest.raises(caption.UserError, match=r"dataset_coco.json: malformed captions json \(TypeError"):
        caption.load_coco(args, "test")


def test_a_stray_annotation_is_named(tmp_path):
    """A filtered captions json that keeps an annotation of an image it dropped said "(KeyError: 9)"."""
    write_coco(tmp_path, "val2017")
    path = tmp_path / "annotations" / "captions_val2017.json"
    d = json.load(open(path))
    d["annotations"].append(dict(id=99, image_id=9, caption="a red square"))
    json.dump(d, open(path, "w"))
    args = caption.p.parse_args(["--data", "coco", "--data_dir", str(tmp_path)])
    with pytest.raises(caption.UserError, match=rf"captions_val2017.json: annotation {len(d['annotations']) - 1}: "
                                                r"image_id 9 is not in its images"):
        caption.load_coco(args, "val2017")


def test_bad_input_is_one_line_exit_2(tmp_path):
    p = run("--data", "coco", "--data_dir", tmp_path / "missing", "--tiny", ok=False)
    assert p.returncode == 2 and "missing" in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0
    os.makedirs(tmp_path / "c" / "annotations")
    (tmp_path / "c" / "annotations" / "captions_train2017.json").write_text('{"images": [')
    p = run("--data", "coco", "--data_dir", tmp_path / "c", "--tiny", ok=False)
    assert p.returncode == 2 and "captions_train2017.json" in p.stderr and "malformed" in p.stderr


def test_reward_stage_resumes_exactly(tmp_path):
    run("--tiny", "--stage", "mle", "--steps", 5, "--out_dir", tmp_path / "m")
    init = tmp_path / "m/caption/mle/ckpt.pt"
    args = ["--tiny", "--stage", "reward", "--init", init, "--steps", 6, "--ckpt_every", 3, "--eval_every", 0,
            "--lr", 1e-3]
    run(*args, "--out_dir", tmp_path / "a")
    p = run(*args, "--out_dir", tmp_path / "b", "--stop_at", 5)  # killed after step 5, last checkpoint at 3
    assert "stopping after step 5" in p.stdout
    run(*args, "--out_dir", tmp_path / "b", "--resume")
    a, b = (torch.load(tmp_path / d / "caption/reward/ckpt.pt", weights_only=True)["model"] for d in "ab")
    start = torch.load(init, weights_only=True)["model"]
    assert max((a[k] - start[k]).abs().max() for k in a) > 1e-4  # the stage really trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_reward_document_frequencies_come_from_every_training_reference(tmp_path, monkeypatch):
    """The reward's CIDEr-D counts document frequencies over the training split's references (the paper's training-set
    statistics): built once, from every training scene's five references, not the held-out ones or the batch's."""
    built = []

    class Spy(caption.CiderD):
        def __init__(self, refs, vocab_size):
            built.append(refs)
            super().__init__(refs, vocab_size)

    monkeypatch.setattr(caption, "CiderD", Spy)
    for flags in (["--stage", "mle", "--steps", "2"], ["--stage", "reward", "--steps", "1"]):
        built.clear()
        monkeypatch.setattr(sys, "argv", ["caption.py", "--tiny", "--out_dir", str(tmp_path), *flags])
        caption.main()
    refs = built[0]  # the reward stage's scorer, made before its first eval (which scores held-out references)
    ck = torch.load(tmp_path / "caption" / "reward" / "ckpt.pt", weights_only=True)
    stoi = {w: i for i, w in enumerate(ck["meta"]["itos"])}
    train = caption.load_synthetic("train", caption.TINY["num_train"], caption.TINY["image_size"], 0)
    assert len(refs) == caption.TINY["num_train"] and all(len(r) == 5 for r in refs)
    for i in (0, len(train) - 1):  # scene i's references as token ids up to their end token
        want = [[stoi.get(w, caption.UNK) for w in caption.tokenize(x)][:20] + [caption.EOS] for x in train[i]["refs"]]
        assert [list(t) for t in refs[i]] == want, i
