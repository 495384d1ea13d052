"""Evaluate a checkpoint: `python run_eval.py --checkpoint DIR --dataset NAME --data_dir DIR`.

The same as `jaxtag-eval` / `python -m jaxtag.cli.evaluate` (see jaxtag.cli.evaluate.py, or --help).
"""

from jaxtag.cli.evaluate import run

if __name__ == "__main__":
    run()
