. .venv/bin/activate
export OMP_NUM_THREADS=1
run() { python caption.py --stage reward --out_dir /tmp/p_$1/out ${@:2} > /tmp/p_$1/reward.txt 2>&1 && python caption.py --stage eval --out_dir /tmp/p_$1/out > /tmp/p_$1/eval.txt 2>&1; }
run cos1e4 --lr 1e-4 --eval_every 150 &
run cos6e5 --lr 6e-5 --eval_every 150 &
wait
