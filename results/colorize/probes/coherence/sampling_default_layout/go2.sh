. .venv/bin/activate
export OMP_NUM_THREADS=1
python colorize.py --stage reward --reward vivid_coherent --top_p 0.8 --eval_every 25 --out_dir out_p08 > r_vc08.txt 2>&1 &
python colorize.py --stage reward --reward vivid_coherent --top_p 0.9 --eval_every 25 --out_dir out_p09 > r_vc09.txt 2>&1 &
wait
date >> dates.txt
