"""Train the self-attention music tagger: `python run_train.py --config configs/demo.py ...`.

The same as `jaxtag-train` / `python -m jaxtag.cli.train` (see jaxtag.cli.train.py, or --help).
"""

from jaxtag.cli.train import run

if __name__ == "__main__":
    run()
