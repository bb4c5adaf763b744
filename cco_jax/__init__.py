"""cco-jax: classifiers that are interpretable by construction.

Modules, in data-flow order:
  datasets        TFDS builders (Oxford-IIIT Pet with masks, Cats-vs-Dogs).
  input_pipeline  data sources -> device batches (images, CAM-resolution masks).
  models          Flax ResNets whose logits decompose exactly into per-pixel maps.
  cams            HiResCAM / ContrastiveCAM arithmetic (pure functions).
  losses          CE, ablated CE, CAM divergence, and the objective registry.
  train           pmapped train/eval steps and the training loop.
"""

__version__ = '0.1.0'
