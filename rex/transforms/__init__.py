"""Model -> model rewrites (eager module edits, function preserving unless stated), each also a ``Transform``
object with one signature (``apply(model, ctx)``, rex.transforms.base) that a method composes."""
from .base import Context, Transform, finish_transforms, run_transforms  # noqa: F401
from .bias_correction import BiasCorrection  # noqa: F401
from .bn_fold import FoldBatchNorm, FoldResult, fold_batchnorm  # noqa: F401
from .equalize import AbsorbHighBias, Equalize  # noqa: F401
from .modules import get_module, set_module  # noqa: F401
from .ocs import SplitOutlierChannels  # noqa: F401
