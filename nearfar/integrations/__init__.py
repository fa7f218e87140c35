"""Integrations with the libraries users already run: Hugging Face transformers (``nearfar.integrations.transformers``)
and diffusers (``nearfar.integrations.diffusers``). Each is an optional extra (``pip install nearfar[hf]``,
``nearfar[diffusers]``) and is imported only when asked for."""
