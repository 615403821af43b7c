. .venv/bin/activate
date > dates.txt
python colorize.py --stage mle --steps 2400 > mle.txt 2>&1; echo "mle $(date)" >> dates.txt
python colorize.py --stage eval > eval.txt 2>&1; echo "eval $(date)" >> dates.txt
