"""The command-line tools, installed as the package ``internvit_tools`` (``python -m internvit_tools.train CONFIG``).

``python tools/<name>.py`` runs the same files from a checkout whose packages are installed (``pip install -e .``);
no tool edits ``sys.path``. Every tool parses its arguments before importing torch, MMEngine or transformers, so
``--help`` answers at once.
"""
