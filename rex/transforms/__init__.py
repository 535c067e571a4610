"""Model -> model rewrites (eager module edits, function preserving unless stated)."""
from .bn_fold import FoldResult, fold_batchnorm  # noqa: F401
from .modules import get_module, set_module  # noqa: F401
