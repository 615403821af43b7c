# Where start-up and MLE-step time goes (panoptic preset). run: PYTHONPATH=. python results/panoptic/probes/timing.py ORACLE
import sys, time, torch, common, panoptic, vqvae
torch.set_num_threads(2)
t = time.time(); sc = common.synthetic_world("train", 10000, 64, 0); print(f"synthetic world, 10000 scenes: {time.time() - t:.1f} s")
t = time.time(); common.synthetic_world("train", 10000, 64, 0); print(f"  again in the same process: {time.time() - t:.4f} s")
o = vqvae.load(sys.argv[1], "panoptic", "cpu")
ds = panoptic.Scenes(sc[:320], common.CATEGORIES, o.c["instances"], 64)
t = time.time(); batches = [torch.utils.data.default_collate([ds[16 * b + i] for i in range(16)]) for b in range(20)]
print(f"building a batch of 16: {(time.time() - t) / 20 * 1000:.1f} ms")
_, img, target, *_ = batches[0]
for _ in range(2): vqvae.encode(o, target, img)
t = time.time()
for _ in range(10): vqvae.encode(o, target, img)
print(f"oracle encode of 16 targets: {(time.time() - t) * 100:.1f} ms")
