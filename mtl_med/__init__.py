"""mtl_med: multi-task learning for medical imaging on MONAI.

Stochastic Filter Groups, Task Routing, AdaShare, cross-stitch and the other sharing
mechanisms of the papers in one set of 2D/3D layers, with MONAI bundles for joint
MR-to-CT synthesis and pelvic organ segmentation.
"""

__version__ = "0.1.0"
