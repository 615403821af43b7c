. .venv/bin/activate
date > dates.txt
python colorize.py --stage oracle --oracle_flags "--patch 4 --local --pixel 16" > oracle.txt 2>&1; echo "oracle $(date)" >> dates.txt
python colorize.py --stage encoder > encoder.txt 2>&1; echo "encoder $(date)" >> dates.txt
python colorize.py --stage mle --steps 2400 > mle.txt 2>&1; echo "mle $(date)" >> dates.txt
python colorize.py --stage reward --top_p 0.9 > reward.txt 2>&1; echo "reward $(date)" >> dates.txt
python colorize.py --stage mle_cont > cont.txt 2>&1; echo "mle_cont $(date)" >> dates.txt
python colorize.py --stage eval --top_p 0.9 > eval1.txt 2>&1; echo "eval $(date)" >> dates.txt
python colorize.py --stage reward --reward vivid_coherent --top_p 0.9 > vc.txt 2>&1; echo "vivid_coherent $(date)" >> dates.txt
python colorize.py --stage eval --top_p 0.9 > eval2.txt 2>&1; echo "eval2 $(date)" >> dates.txt
