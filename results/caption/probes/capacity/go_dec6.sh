set -e
. .venv/bin/activate
export OMP_NUM_THREADS=1
F="--dec_layers 6"
python caption.py --stage encoder $F
python caption.py --stage mle $F
python caption.py --stage reward $F --eval_every 150
python caption.py --stage mle_cont $F --eval_every 150
python caption.py --stage eval $F
