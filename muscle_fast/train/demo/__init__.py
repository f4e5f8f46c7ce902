"""``muscle-fast demo``: a real model update on tiny transformers + peft models, end to end.

Read the files in order, one step of the story each:

1. ``setting``: the digit-operation world, the two pre-training corpora, the downstream task (a
   two-token answer, labels with irreducible noise, the loss over context and answer tokens)
   and ``DemoConfig``.
2. ``bases``: two tiny Llama bases pre-trained here; the update is a new pre-training run (own
   init, another corpus mix, more compute), cached in the output directory.
3. ``adapters``: a LoRA task adapter per base, kept at its best validation loss; the task
   models' greedy answers on held-out items.
4. ``rows``: the compatibility rows trained from the v2 task adapter with
   ``compat_training_step``: MUSCLE (live and from a teacher cache), ``old_correct``, plain KD
   from v1, the likelihood masks with CE, and the CE control at the same and at 4x the steps.
5. ``report``: the paper's columns (acc, NFR, PFR, NFR_mc, dNFR_c, d%NFR_c, dacc_c), the four
   rungs of the ladder per seed, the goal and the printed lines.
6. ``run``: the three phases over all seeds in parallel processes, ``results.json``,
   ``details.json``, and the command line.
7. ``plot``: ``flips.png``.
"""
from .report import summarize
from .run import DEFAULT_SEEDS, add_demo_arguments, demo_main, run_demo
from .setting import (
    CACHE_ROWS,
    CACHE_TOPK_K,
    COMPAT_ROWS,
    OPS,
    ROW_NAMES,
    V1,
    V2,
    BaseSpec,
    DemoConfig,
)

__all__ = ["CACHE_ROWS", "CACHE_TOPK_K", "COMPAT_ROWS", "DEFAULT_SEEDS", "OPS", "ROW_NAMES", "V1",
           "V2", "BaseSpec", "DemoConfig", "add_demo_arguments", "demo_main", "run_demo",
           "summarize"]
