"""Train the self-attention music tagger: `python run_train.py --config configs/demo.py ...`.

The same as `jaxtag-train` / `python -m jaxtag.run_train` (see jaxtag/run_train.py, or --help).
"""

from jaxtag.run_train import run

if __name__ == "__main__":
    run()
