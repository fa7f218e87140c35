"""The quality suite of ``nearfar bench``: task generators (``tasks``) and training/evaluation (``quality``)."""
