set -e
. .venv/bin/activate
export OMP_NUM_THREADS=1
python caption.py --stage encoder --steps 3000
python caption.py --stage mle
python caption.py --stage reward --eval_every 150
python caption.py --stage mle_cont --eval_every 150
python caption.py --stage eval
