cd /tmp/cl48/code && . /work/main/.venv/bin/activate
O=/tmp/cl48/out
date > ../dates.txt
python colorize.py --stage mle --steps 4800 --out_dir $O > ../mle.txt 2>&1; echo "mle $(date)" >> ../dates.txt
python colorize.py --stage reward --out_dir $O > ../reward.txt 2>&1; echo "reward $(date)" >> ../dates.txt
python colorize.py --stage mle_cont --out_dir $O > ../mle_cont.txt 2>&1; echo "mle_cont $(date)" >> ../dates.txt
python colorize.py --stage eval --out_dir $O > ../eval.txt 2>&1; echo "eval $(date)" >> ../dates.txt
mv $O/colorize/eval $O/colorize/eval_top_p09
python colorize.py --stage eval --top_p 1 --out_dir $O > ../eval_top_p1.txt 2>&1; echo "eval_top_p1 $(date)" >> ../dates.txt
