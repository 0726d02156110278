"""Game steps per second of the main job at a given --parallel-games, through the real training loop:

    python -m benchmarks.game_steps G [MEASURED]     (1 warm-up episode, then MEASURED episodes; default 2)

Prints seconds per episode, game steps (decisions) per second and the tokens through the backbone per episode
(ppo/tokens_computed; None for commits before the prompt tree, which do not log it). Run it on an idle machine;
compare versions in one sitting, the older one with `PYTHONPATH=<its checkout> python benchmarks/game_steps.py G`.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time


def main(argv: list[str]) -> None:
    from moral.config import RunConfig
    from moral.finetune import FineTuning

    games, measured = int(argv[0]), int(argv[1]) if len(argv) > 1 else 2
    folder = tempfile.mkdtemp(prefix="game-steps-")
    try:
        run = FineTuning(RunConfig(episodes=measured + 1, parallel_games=games).resolve(), f"{folder}/run",
                         progress=False)
        times, tokens = [], []
        for i in range(measured + 1):
            t = time.perf_counter()
            episode = run.run_episode()
            if i:
                times.append(time.perf_counter() - t)
                tokens.append(episode.stats["agent"].get("ppo/tokens_computed"))  # None before the tree
        run.logs.close()
        seconds = sum(times) / len(times)
        print(f"--parallel-games {games}: {seconds:.2f} s/episode, {run.config.steps * games / seconds:.2f} game "
              f"steps/s, tokens per episode {tokens}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
