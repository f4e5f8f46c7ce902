"""MUSCLE training: the compatibility adapter with peft + transformers.

Needs the ``train`` extra (transformers, peft, accelerate, tqdm).
"""
from .cache import (
    CachedCompatModel,
    TeacherCache,
    TeacherCacheError,
    build_cached_compat_model,
    build_teacher_cache,
)
from .loop import compat_training_step
from .model import (
    CompatArguments,
    CompatModel,
    build_compat_model,
    check_same_vocabulary,
    compat_loss,
)

__all__ = [
    "CachedCompatModel",
    "CompatArguments",
    "CompatModel",
    "CompatTrainer",
    "TeacherCache",
    "TeacherCacheError",
    "build_cached_compat_model",
    "build_compat_model",
    "build_teacher_cache",
    "check_same_vocabulary",
    "compat_loss",
    "compat_training_step",
    "run_demo",
]


def __getattr__(name):  # transformers.Trainer and the demo import lazily
    if name == "CompatTrainer":
        from .trainer import CompatTrainer
        return CompatTrainer
    if name == "run_demo":
        from .demo import run_demo
        return run_demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
