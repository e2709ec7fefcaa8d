"""The pelvis application: SFG-HighResNet's synthetic CT and pelvic organs (SFG paper, section 5.2, appendix A.3).

Everything that is about the pelvis and not about multi-task learning lives in this package, above the generic
layers (data, transforms, metrics, inference), which take its values as arguments:

* :mod:`mtl_med.pelvis.constants` - the label table, CT range and scale, task names, the organs of Table 2;
  re-exported here, so ``mtl_med.pelvis.LABEL_TABLE`` is what the bundle configs name;
* :mod:`mtl_med.pelvis.phantoms` - the synthetic pelvis phantoms (MR, CT, labels, masks) the tests, the demo and
  the benchmarks run on.

No generic module imports this package; the bundle ``bundles/sfg_highresnet_pelvis``, the demo and the command-line
tools do.
"""

from mtl_med.pelvis.constants import *  # noqa: F401,F403
from mtl_med.pelvis.constants import __all__  # noqa: F401
