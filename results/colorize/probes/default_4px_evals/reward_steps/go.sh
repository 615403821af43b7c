. .venv/bin/activate
date > dates.txt
python colorize.py --stage reward --steps 100 --eval_every 25 > r100.txt 2>&1; echo "reward100 $(date)" >> dates.txt
python colorize.py --stage reward --reward vivid_coherent --steps 100 --eval_every 25 > vc100.txt 2>&1; echo "vc100 $(date)" >> dates.txt
