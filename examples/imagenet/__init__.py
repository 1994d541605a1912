"""The ImageNet example, run as a script (``python examples/imagenet/train.py``).

A regular package, so that ``examples/train.py`` finds its ``pod`` package as
``imagenet.pod`` before any other ``imagenet`` on ``sys.path``.
"""
