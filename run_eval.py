"""Evaluate a checkpoint: `python run_eval.py --checkpoint DIR --dataset NAME --data_dir DIR`.

The same as `jaxtag-eval` / `python -m jaxtag.run_eval` (see jaxtag/run_eval.py, or --help).
"""

from jaxtag.run_eval import run

if __name__ == "__main__":
    run()
