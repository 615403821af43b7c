# Issue 24 probe: SCST's greedy baseline instead of the leave-one-out mean (greedy_baseline.diff on caption.py at 168036f).
# D holds a default run made at 168036f (python caption.py --out_dir /tmp/capP/out: its metrics.json is byte-identical
# to results/caption/metrics.json); its encoder, mle and mle_cont are copied to the probe's out_dir. 2 threads, alone.
mkdir -p /tmp/capP/outg/caption && cp -r /tmp/capP/out/caption/{encoder,mle,mle_cont} /tmp/capP/outg/caption/
OMP_NUM_THREADS=2 python caption.py --stage reward --out_dir /tmp/capP/outg --baseline greedy --eval_every 150
OMP_NUM_THREADS=2 python caption.py --stage eval --out_dir /tmp/capP/outg
