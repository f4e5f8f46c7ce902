"""``python -m muscle_fast.train.demo``: the same as ``muscle-fast demo``."""
import argparse

from .run import add_demo_arguments, demo_main

raise SystemExit(demo_main(add_demo_arguments(argparse.ArgumentParser(
    prog="python -m muscle_fast.train.demo")).parse_args()))
