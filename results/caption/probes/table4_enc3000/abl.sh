. .venv/bin/activate
export OMP_NUM_THREADS=1
run() { python caption.py --stage reward --out_dir /tmp/abl_$1/out --temperature 1 ${@:2} > /tmp/abl_$1/reward.txt 2>&1 && python caption.py --stage eval --out_dir /tmp/abl_$1/out > /tmp/abl_$1/eval.txt 2>&1; }
(run none --baseline none; run k4 --samples 4) &
(run k2 --samples 2; run k8 --samples 8) &
wait
