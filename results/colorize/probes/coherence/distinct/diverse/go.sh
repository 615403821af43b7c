set -e
. .venv/bin/activate
export OMP_NUM_THREADS=1
date > dates.txt
python colorize.py --stage reward --reward vivid_diverse --eval_every 25 > run_vd.txt 2>&1 &
python colorize.py --stage reward --reward vivid_diverse_coherent --eval_every 25 > run_vdc.txt 2>&1
wait
date >> dates.txt
# then (2 threads, alone): the vivid_diverse run resumed to 100 steps (constant lr: the same run), and the eval:
# cp -r out/colorize/reward_vivid_diverse out/colorize/reward_vivid_diverse_at50
# python colorize.py --stage reward --reward vivid_diverse --eval_every 25 --resume --steps 100
# mv out/colorize/reward_vivid_diverse out/colorize/reward_vivid_diverse_100
# mv out/colorize/reward_vivid_diverse_at50 out/colorize/reward_vivid_diverse
# python colorize.py --stage eval      (out/colorize/{encoder,mle}, out/vqvae_colorize: the default run's, symlinked)
