. .venv/bin/activate
while pgrep -f "c4e/go.sh|bash go.sh" > /dev/null; do sleep 5; done
python colorize.py --stage eval --top_p 1 > eval_top_p1.txt 2>&1; cp -r out/colorize/eval out/colorize/eval_top_p1
python colorize.py --stage eval --eval_temperature 0 > eval_greedy.txt 2>&1; cp -r out/colorize/eval out/colorize/eval_greedy
echo done $(date) >> dates3.txt
