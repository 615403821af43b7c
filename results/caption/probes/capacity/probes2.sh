. .venv/bin/activate
export OMP_NUM_THREADS=1
run() { python caption.py --stage reward --out_dir /tmp/p_$1/out ${@:2} > /tmp/p_$1/reward.txt 2>&1 && python caption.py --stage eval --out_dir /tmp/p_$1/out > /tmp/p_$1/eval.txt 2>&1; }
run enclr1 --enc_lr_mult 1 --eval_every 150 &
run steps600 --steps 600 --eval_every 150 &
wait
