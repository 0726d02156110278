"""The command line (moral/cli.py): fine-tune (default), evaluate or report. Same as `python -m moral` and the
console script `moral-ppo`.

    python run.py --reward deont --opponent tft                 fine-tune the embedded model (the main job)
    python run.py --resume runs/deont-tft-seed0-...             continue a stopped run
    python run.py eval RUN_FOLDER [RUN_FOLDER ...]               generalisation tests
    python run.py report RUN_FOLDER [...] --out DIR             tables and figures
"""

from moral.cli import main

if __name__ == "__main__":
    main()
