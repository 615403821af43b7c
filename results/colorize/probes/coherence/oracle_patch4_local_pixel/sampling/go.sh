. .venv/bin/activate
date > dates.txt
python colorize.py --stage oracle --oracle_flags "--patch 4 --local --pixel 16" > oracle.txt 2>&1; date >> dates.txt
python colorize.py --stage encoder > encoder.txt 2>&1; date >> dates.txt
python colorize.py --stage mle --steps 2400 --eval_every 800 > mle.txt 2>&1; date >> dates.txt
