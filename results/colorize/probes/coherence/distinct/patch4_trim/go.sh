. .venv/bin/activate
date > dates.txt
python colorize.py > run.txt 2>&1; echo "all $(date)" >> dates.txt
python colorize.py --stage reward --reward vivid_coherent > vc.txt 2>&1; echo "vivid_coherent $(date)" >> dates.txt
python colorize.py --stage eval > eval2.txt 2>&1; echo "eval2 $(date)" >> dates.txt
