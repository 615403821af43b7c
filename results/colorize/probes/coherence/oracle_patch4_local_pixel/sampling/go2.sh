. .venv/bin/activate
export OMP_NUM_THREADS=1
python colorize.py --stage reward --top_p 0.9 --eval_every 50 --out_dir out_p09 > r_color.txt 2>&1 &
python colorize.py --stage reward --reward vivid_coherent --top_p 0.9 --eval_every 50 --out_dir out_p09 > r_vc.txt 2>&1 &
wait
date >> dates.txt
export OMP_NUM_THREADS=2
python colorize.py --stage mle_cont --out_dir out_p09 > cont.txt 2>&1
python colorize.py --stage eval --top_p 0.9 --out_dir out_p09 > eval_p09.txt 2>&1
date >> dates.txt
