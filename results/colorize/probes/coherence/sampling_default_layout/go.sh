. .venv/bin/activate
date > dates.txt
python colorize.py --stage oracle > oracle.txt 2>&1; date >> dates.txt
python colorize.py --stage encoder > encoder.txt 2>&1; date >> dates.txt
python colorize.py --stage mle > mle.txt 2>&1; date >> dates.txt
