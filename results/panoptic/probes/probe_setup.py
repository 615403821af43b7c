# shared set-up of the probe scripts: argv = STAGE2_CKPT ORACLE_CKPT (or ORACLE_CKPT alone: no stage II model)
import os, sys, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../.."))
import vqvae, panoptic, common


def load(n_val):
    """-> stage II model (or None), oracle, held-out Scenes (n_val), categories, allowed tokens, the first n_val items batched."""
    oracle = vqvae.load(sys.argv[-1], "panoptic", "cpu"); c = oracle.c
    model = None
    if len(sys.argv) > 2:
        ck = common.load_ckpt(sys.argv[1], "panoptic")
        model = common.EncoderDecoder(ck["config"]); model.load_state_dict(ck["model"]); model.eval()
    args = panoptic.p.parse_args(["--num_val", str(n_val), "--num_train", "10"])
    for k, v in panoptic.PRESETS["synthetic"].items():
        if getattr(args, k, None) is None: setattr(args, k, v)
    args.image_size = c["image_size"]
    tr, va, cats = panoptic.load_data(args)
    ds = panoptic.Scenes(va, cats, c["instances"], c["image_size"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=n_val)))
    return model, oracle, ds, cats, vqvae.allowed_tokens(c["codebook"], "cpu"), batch
