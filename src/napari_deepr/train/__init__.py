"""The Deep-R trainer (PyTorch lives only in this package).

Run it as its own process::

    python -m napari_deepr.train DATASET -o MODEL_DIR [--minutes M | --iterations N] [...]

``DATASET`` is a pairs folder written by :func:`napari_deepr.stacks.pairs.build_pairs`
(``deepr pairs``) or a JSON file ``{"synthetic": {...}}`` whose object holds keyword arguments
of :func:`napari_deepr.optics.simulate.random_training_pair` (``optics`` may be a preset name
``"20x_0.75"`` / ``"40x_0.95"`` or a dict of :class:`~napari_deepr.optics.psf.Optics` fields)
plus ``real_images_dir``, ``validation_pairs`` and ``validation_seed``.

The process prints one JSON object per line on stdout (see :mod:`.loop` and :mod:`.__main__`),
stops cleanly on SIGINT/SIGTERM or a ``MODEL_DIR/STOP`` file, and ends by exporting
``generator.onnx``, ``dpm.onnx`` and ``model.json`` (:mod:`.export`).

Modules: :mod:`.nets` (generator, DPM decoder, discriminator), :mod:`.losses`, :mod:`.data` and
:mod:`.synthetic` (data sources), :mod:`.config` (settings), :mod:`.loop` (the run, composed of
:mod:`.budget`, :mod:`.phases`, :mod:`.validation`, :mod:`.checkpoint` and :mod:`.card`),
:mod:`.export` (ONNX), :mod:`.parent` (which model a run starts from). Importing this package does
not import torch.
"""
