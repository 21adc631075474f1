"""Replay a tool-calling trace under several policies and request rates (same as `infercept replay`).

    python scripts/replay_trace.py --trace builtin:mixed --simulate --profile a100-gptj-6b \
        --qps 1 --qps 2 --qps 3 --qps 4 --out results/sim-6b
"""
import argparse

from infercept_jax.experiments.sweeps import add_replay_arguments, replay_command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_replay_arguments(parser)
    try:
        replay_command(parser.parse_args())
    except (ValueError, OSError) as error:       # a missing or malformed trace, an unknown profile
        parser.error(str(error))


if __name__ == "__main__":
    main()
